"""`Tool`: what a model or client may call, and the `@tool` marker."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

# needs_approval: a bool, or a predicate on the validated arguments ("only above 25 °C").
Approval = bool | Callable[[Mapping[str, Any]], bool]


class ToolError(Exception):
    """A tool failed in a way the caller (the model) should be told about; `str()` says why."""


class ToolInputError(ToolError):
    """The arguments do not match the tool's parameters; the message names the bad field."""


@dataclass(frozen=True)
class Tool:
    """A callable tool. `invoke` validates `args` (when a validator is known), then awaits
    `fn(**args)`; its result must be JSON-serialisable."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., Any] = field(repr=False)
    needs_approval: Approval = False
    read_only: bool = False
    # Validates and normalises arguments (raises ToolInputError); None: passed as given.
    validate: Callable[[Mapping[str, Any]], dict[str, Any]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(
                f"tool name {self.name!r}: use letters, digits, '_', '.', '-' (at most 64, "
                "starting with a letter or '_')"
            )
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name}: parameters must be a JSON schema of type object")

    def check(self, args: Mapping[str, Any] | None) -> dict[str, Any]:
        """The validated arguments, or ToolInputError naming what is wrong."""
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise ToolInputError(f"{self.name}: arguments must be an object, got {args!r}")
        if self.validate is not None:
            return self.validate(args)
        return dict(args)

    def approval_required(self, args: Mapping[str, Any]) -> bool:
        if callable(self.needs_approval):
            return bool(self.needs_approval(args))
        return bool(self.needs_approval)

    async def invoke(self, args: Mapping[str, Any] | None = None) -> Any:
        checked = self.check(args)
        result = self.fn(**checked)
        if inspect.isawaitable(result):
            result = await result
        return result

    def openai_spec(self) -> dict[str, Any]:
        """The tool as an OpenAI chat-completions `tools` entry."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True, slots=True)
class ToolMarker:
    name: str | None
    description: str | None
    needs_approval: Approval
    read_only: bool


def tool(
    fn: F | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    needs_approval: Approval = False,
    read_only: bool = False,
) -> Any:
    """Mark a function or agent method as a tool (`agent_tools` collects an agent's).

    The schema comes from the type hints, the description from the docstring, each
    parameter's description from its "Args:" entry."""
    marker = ToolMarker(name, description, needs_approval, read_only)

    def mark(target: F) -> F:
        target.__gw_tool__ = marker  # type: ignore[attr-defined]
        return target

    return mark(fn) if fn is not None else mark


def tool_marker(target: Any) -> ToolMarker | None:
    return getattr(target, "__gw_tool__", None)
