"""The host side of `codemode.<tool>(input)`: JS names for tools, and answering one call.

Every call from a program is checked here before anything runs: the name must be one of the
tools granted to this run, the input must be a JSON object valid against the tool's schema
(the tool's own validator when it has one, else the JSON schema itself), and a tool that needs
approval waits for the `approve` hook. The answer is JSON text or an error message that names
the tool, which the program sees as a rejected promise (a `ToolError`).
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_jsonable_python

from gatewayd.codemode.clock import RunClock
from gatewayd.tools import Tool, ToolError, ToolInputError

# JavaScript reserved words (and strict-mode ones): a tool named like one gets a "_" suffix.
# fmt: off
JS_RESERVED = frozenset((
    "await", "break", "case", "catch", "class", "const", "continue", "debugger", "default",
    "delete", "do", "else", "enum", "export", "extends", "false", "finally", "for", "function",
    "if", "implements", "import", "in", "instanceof", "interface", "let", "new", "null",
    "package", "private", "protected", "public", "return", "static", "super", "switch", "this",
    "throw", "true", "try", "typeof", "var", "void", "while", "with", "yield", "arguments",
    "eval", "undefined", "NaN", "Infinity",
))
# fmt: on
logger = logging.getLogger(__name__)
_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9_$]")


@dataclass(frozen=True)
class ToolCall:
    """One call a program makes, as the approval hook sees it."""

    tool: Tool
    args: Mapping[str, Any]


Approve = Callable[[ToolCall], Awaitable[bool]]


def js_name(name: str) -> str:
    """The identifier a tool has in the sandbox: `my-server.list-items` -> `my_server_list_items`,
    a reserved word gets a `_` suffix, a leading digit a `_` prefix."""
    ident = _NOT_IDENTIFIER.sub("_", name) or "_"
    if ident[0].isdigit():
        ident = "_" + ident
    if ident in JS_RESERVED:
        ident += "_"
    return ident


def bind(tools: Sequence[Tool]) -> dict[str, Tool]:
    """{JS name: tool}. Raises ValueError when two tools end up with the same JS name."""
    bound: dict[str, Tool] = {}
    for item in tools:
        ident = js_name(item.name)
        if ident in bound:
            raise ValueError(
                f"tools {bound[ident].name!r} and {item.name!r} both become codemode.{ident}: "
                "rename one"
            )
        bound[ident] = item
    return bound


class Caller:
    """Answers a run's tool calls: (JS name, input JSON) -> (ok, result JSON or message)."""

    def __init__(self, tools: Mapping[str, Tool], approve: Approve | None) -> None:
        self._tools = tools
        self._approve = approve
        self._validators: dict[str, Callable[[Mapping[str, Any]], None]] = {}

    async def __call__(self, name: str, input_json: str, clock: RunClock) -> tuple[bool, str]:
        tool = self._tools.get(name)
        if tool is None:
            return False, f"codemode.{name}: no such tool in this run"
        try:
            args = json.loads(input_json)
        except ValueError:
            return False, f"codemode.{name}: the input is not JSON"
        if not isinstance(args, dict):
            return False, f"codemode.{name}: the input must be an object, got {input_json[:80]}"
        try:
            args = self._check(tool, args)
        except ToolInputError as exc:
            return False, _named(tool, exc)
        if tool.approval_required(args):
            if self._approve is None:
                return False, f"{tool.name} needs a person's approval, and none can be asked here"
            with clock.paused():
                try:
                    approved = await self._approve(ToolCall(tool, args))
                except Exception as exc:  # the approver failed: nobody said yes
                    logger.warning("codemode: approving %s failed: %r", tool.name, exc)
                    approved = False
            if not approved:
                return False, f"{tool.name}: the call was denied by the person approving it"
        try:
            value = tool.fn(**args)  # Tool.invoke without its check: `args` are checked
            if inspect.isawaitable(value):
                value = await value
        except ToolError as exc:
            return False, _named(tool, exc)
        except Exception as exc:
            return False, f"{tool.name} failed: {type(exc).__name__}: {exc}"
        try:
            if value is None:
                return True, ""
            return True, json.dumps(value, separators=(",", ":"), default=to_jsonable_python)
        except (TypeError, ValueError) as exc:
            return False, f"{tool.name}: its result cannot be turned into JSON: {exc}"

    def _check(self, tool: Tool, args: dict[str, Any]) -> dict[str, Any]:
        if tool.validate is not None:
            return tool.check(args)
        validator = self._validators.get(tool.name)
        if validator is None:
            validator = self._validators[tool.name] = schema_validator(tool)
        validator(args)
        return args


def _named(tool: Tool, exc: Exception) -> str:
    text = str(exc)
    return text if text.startswith(tool.name) else f"{tool.name}: {text}"


def schema_validator(tool: Tool) -> Callable[[Mapping[str, Any]], None]:
    """A check of arguments against `tool.parameters` (JSON schema); raises ToolInputError."""
    from jsonschema import validators

    cls = validators.validator_for(tool.parameters)
    checker = cls(tool.parameters)

    def check(args: Mapping[str, Any]) -> None:
        problems = []
        for error in sorted(checker.iter_errors(args), key=lambda e: list(e.absolute_path)):
            where = ".".join(str(part) for part in error.absolute_path) or "input"
            problems.append(f"{where}: {error.message}")
        if problems:
            raise ToolInputError(f"{tool.name}: invalid arguments: " + "; ".join(problems[:5]))

    return check
