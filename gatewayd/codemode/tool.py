"""`code_tool`: the one tool a chat agent offers its model in Code Mode.

    code = code_tool(executor, tools, approve=ask_the_user)   # a gatewayd.tools.Tool
    # offer [code] instead of tools; the model writes one program calling them all

Its description carries the typed API (`render_api`) and how to write the program; calling it
runs the program and returns `{"result": ...}` or `{"error": ...}`, with `"logs"` when the
program logged. A tool that needs approval pauses the program's call until `approve` answers
(the program's wall-clock limit stops meanwhile); without `approve` such calls are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gatewayd.codemode.bindings import Approve
from gatewayd.codemode.executor import CodeExecutor
from gatewayd.codemode.typed_api import render_api
from gatewayd.tools import Tool, ToolInputError

INSTRUCTIONS = """Run one JavaScript program that uses the tools below, instead of calling them one \
at a time. Write an async arrow function, for example:
async () => {
  const ids = await codemode.some_tool({});
  return ids.length;
}
Every tool is `await codemode.<name>(input)` and returns a Promise. Loop, filter and combine \
results in the program; only what it returns (JSON) and what it logs with console.log come back \
to you. There is no network, no file system, no require or import."""


def code_tool(
    executor: CodeExecutor,
    tools: Sequence[Tool],
    *,
    approve: Approve | None = None,
    name: str = "code",
) -> Tool:
    """A Tool named `name` that runs a program with `tools` bound, on `executor`."""
    granted = list(tools)
    description = f"{INSTRUCTIONS}\n\n```ts\n{render_api(granted)}\n```"

    async def run_code(code: str) -> dict[str, Any]:
        result = await executor.run(code, granted, approve=approve)
        return result.for_model()

    return Tool(
        name=name,
        description=description,
        parameters={
            "type": "object",
            "properties": {
                "code": {
                    "type": "string",
                    "description": "The program: an async arrow function using codemode.*",
                }
            },
            "required": ["code"],
            "additionalProperties": False,
        },
        fn=run_code,
        read_only=all(item.read_only for item in granted),
        validate=_validate_code,
    )


def _validate_code(args: Any) -> dict[str, Any]:
    code = args.get("code")
    extra = sorted(set(args) - {"code"})
    if not isinstance(code, str) or not code.strip():
        raise ToolInputError("code: the program (a non-empty string) is required")
    if extra:
        raise ToolInputError(f"code: unexpected arguments {', '.join(extra)}")
    return {"code": code}
