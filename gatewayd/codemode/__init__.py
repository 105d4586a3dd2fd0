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

from gatewayd.codemode.bindings import Approve, ToolCall, js_name
from gatewayd.codemode.code_tool import code_tool
from gatewayd.codemode.executor import CodeExecutor, RunResult
from gatewayd.codemode.limits import CodeModeError, Limits
from gatewayd.codemode.process import LogLine
from gatewayd.codemode.typed_api import render_api

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
