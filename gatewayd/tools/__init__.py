"""Tools: functions a model (chat tool calls, Code Mode programs) or an MCP client may call.

One `Tool` shape is shared by every caller: a name, a description, a JSON-schema `parameters`
object, an async `invoke(args)`, whether it needs a person's approval, and whether it only
reads. `tool_from_function` derives the schema from type hints and the docstring; `@tool`
marks a function or an agent method; `callable_tools` turns an agent class's `@callable`
methods into tools that reach the agent through the runtime (so every call is a normal turn).

This package never imports `gatewayd.daemon`, `gatewayd.api`, `gatewayd.chat`, `engine` or
`protocols`: chat, Code Mode and the API build on it, not the other way round.
"""

from gatewayd.tools.agent_tools import agent_tools, callable_tools
from gatewayd.tools.schema import tool_from_function
from gatewayd.tools.tool import Tool, ToolError, ToolInputError, tool

__all__ = [
    "Tool",
    "ToolError",
    "ToolInputError",
    "agent_tools",
    "callable_tools",
    "tool",
    "tool_from_function",
]
