"""`tool_from_function`: a `Tool` whose JSON schema and validation come from type hints.

pydantic builds the argument model (so `int`, `float | None`, `Literal[...]`, nested models,
defaults all work and validate the same way); the docstring's first paragraph is the tool's
description and its Google-style "Args:" entries describe the parameters.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, create_model

from gatewayd.tools.tool import Approval, Tool, ToolInputError, tool_marker

_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SECTION = re.compile(r"^[A-Z][A-Za-z ]*:$")
_ARG_HEADERS = ("Args:", "Arguments:", "Parameters:")


def split_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a docstring: the text before the first
    section header ("Args:", "Returns:" ...) is the description; "Args:" entries describe
    the parameters (continuation lines are joined)."""
    description: list[str] = []
    params: dict[str, str] = {}
    section = "description"
    arg_indent: int | None = None
    current: str | None = None
    for line in inspect.cleandoc(doc or "").splitlines():
        stripped = line.strip()
        if _SECTION.match(line):
            section = "args" if stripped in _ARG_HEADERS else "other"
            arg_indent, current = None, None
        elif section == "description":
            description.append(stripped)
        elif section == "args" and stripped:
            indent = len(line) - len(line.lstrip())
            match = _ARG_LINE.match(stripped)
            if match and (arg_indent is None or indent == arg_indent):
                arg_indent, current = indent, match.group(1).lstrip("*")
                params[current] = match.group(2).strip()
            elif current is not None:
                params[current] = f"{params[current]} {stripped}"
    return " ".join(" ".join(description).split()), params


def tool_from_function(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    needs_approval: Approval | None = None,
    read_only: bool | None = None,
    skip: Iterable[str] = (),
) -> Tool:
    """A Tool calling `fn(**args)`. Options left None come from `@tool` on `fn`, then from
    `fn` itself (its `__name__`, its docstring). `skip` names parameters the caller fills in."""
    marker = tool_marker(fn)
    if marker is not None:
        name = name or marker.name
        description = description or marker.description
        needs_approval = marker.needs_approval if needs_approval is None else needs_approval
        read_only = marker.read_only if read_only is None else read_only
    doc_description, param_docs = split_docstring(inspect.getdoc(fn))
    tool_name = str(name or getattr(fn, "__name__", "tool"))
    model = _arguments_model(fn, tool_name, param_docs, set(skip))
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)

    def validate(args: Mapping[str, Any]) -> dict[str, Any]:
        try:
            parsed = model.model_validate(dict(args))
        except ValidationError as err:
            raise ToolInputError(_describe(tool_name, err)) from None
        return {key: getattr(parsed, key) for key in type(parsed).model_fields}

    return Tool(
        name=tool_name,
        description=str(description or doc_description or tool_name),
        parameters=schema,
        fn=fn,
        needs_approval=False if needs_approval is None else needs_approval,
        read_only=bool(read_only),
        validate=validate,
    )


def _arguments_model(
    fn: Callable[..., Any], tool_name: str, param_docs: dict[str, str], skip: set[str]
) -> Any:
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: fall back to the raw ones
        hints = {}
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.name in skip or param.name == "self":
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name}: *args and **kwargs cannot be described as JSON")
        annotation = hints.get(param.name, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = Any
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (
            annotation,
            Field(default, description=param_docs.get(param.name) or None),
        )
    return create_model(  # type: ignore[call-overload]
        f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
    )


def _describe(tool_name: str, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        where = ".".join(str(part) for part in item["loc"]) or "arguments"
        problems.append(f"{where}: {item['msg']}")
    return f"{tool_name}: invalid arguments: " + "; ".join(problems)
