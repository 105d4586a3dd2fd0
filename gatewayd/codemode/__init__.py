"""Code Mode: a model writes one JavaScript program against a typed API of its tools, and the
program runs in a fresh V8 context in a sandbox worker process whose only reach into the world
is `codemode.<tool>(input)`, proxied to the host (capabilities, not credentials).

    from gatewayd.codemode import CodeExecutor, code_tool, render_api

`CodeExecutor` (a pool of warm worker processes, limits in `Limits`), `render_api(tools)` (the
TypeScript-style declaration the model reads), `code_tool(executor, tools)` (the `code` tool a
chat agent offers its model). Needs the `codemode` extra (`mini-racer`, `jsonschema`).

This package builds on `gatewayd.tools`; it never imports `gatewayd.chat`, `gatewayd.agents`,
`gatewayd.daemon`, `engine` or `protocols`. The worker (`_worker.py`) imports only the standard
library, `py_mini_racer` and `_wire`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gatewayd.codemode.bindings import Approve, ToolCall, js_name
    from gatewayd.codemode.executor import CodeExecutor, RunResult
    from gatewayd.codemode.limits import CodeModeError, Limits
    from gatewayd.codemode.process import LogLine
    from gatewayd.codemode.tool import code_tool
    from gatewayd.codemode.typed_api import render_api

# Lazy, so the sandbox worker (`python -m gatewayd.codemode._worker`) loads none of the host's
# modules (pydantic, gatewayd.tools) when Python imports this package on its way.
_HOMES = {
    "Approve": "bindings", "ToolCall": "bindings", "js_name": "bindings",
    "code_tool": "tool", "CodeExecutor": "executor", "RunResult": "executor",
    "CodeModeError": "limits", "Limits": "limits", "LogLine": "process",
    "render_api": "typed_api",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gatewayd.codemode' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"gatewayd.codemode.{home}"), name)


__all__ = [
    "Approve",
    "CodeExecutor",
    "CodeModeError",
    "Limits",
    "LogLine",
    "RunResult",
    "ToolCall",
    "code_tool",
    "js_name",
    "render_api",
]
