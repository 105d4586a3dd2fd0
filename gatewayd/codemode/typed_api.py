"""Tools -> the TypeScript-style declaration of `codemode` that the model reads.

    declare const codemode: {
      /** Read one thermostat. */
      thermostat_read(input: {
        /** The thermostat's id. */
        id: string;
      }): Promise<{ room: string; temperature_c: number; target_c: number }>;
    };

Parameters come from each tool's JSON schema (`$ref`s into `$defs` inlined, descriptions as doc
comments, defaults noted); the result type from the function's return annotation when the
tool wraps an annotated function, else `unknown`.
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from gatewayd.codemode.bindings import bind
from gatewayd.tools import Tool

MAX_DEPTH = 8
_IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
_PRIMITIVES = {"string": "string", "number": "number", "integer": "number",
               "boolean": "boolean", "null": "null"}  # fmt: skip


def render_api(tools: Sequence[Tool]) -> str:
    """The declaration of `codemode` for `tools`, as the model should read it."""
    lines = ["declare const codemode: {"]
    for ident, item in bind(tools).items():
        doc = item.description.strip()
        if item.needs_approval:
            doc += "\nNeeds a person's approval: the call waits until they answer."
        lines.extend(_doc_comment(doc, "  "))
        if item.parameters.get("properties"):
            params = "input: " + _render(item.parameters, item.parameters, "  ", 0)
        else:
            params = "input?: {}"
        lines.append(f"  {ident}({params}): Promise<{_result_type(item)}>;")
    lines.append("};")
    return "\n".join(lines)


def _doc_comment(text: str, indent: str) -> list[str]:
    text = text.replace("*/", "*\\/").strip()
    if not text:
        return []
    parts = text.splitlines()
    if len(parts) == 1:
        return [f"{indent}/** {parts[0]} */"]
    return [f"{indent}/**", *(f"{indent} * {part}".rstrip() for part in parts), f"{indent} */"]


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part, {}) if isinstance(target, Mapping) else {}
    return target if isinstance(target, Mapping) else {}


def _render(schema: Any, root: Mapping[str, Any], indent: str, depth: int) -> str:
    if not isinstance(schema, Mapping) or depth > MAX_DEPTH:
        return "unknown"
    schema = _resolve(schema, root)
    if "const" in schema:
        return json.dumps(schema["const"])
    if isinstance(schema.get("enum"), list):
        return " | ".join(json.dumps(value) for value in schema["enum"]) or "never"
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            options = [_render(option, root, indent, depth + 1) for option in schema[key]]
            return " | ".join(dict.fromkeys(options)) or "unknown"
    if isinstance(schema.get("allOf"), list):
        return " & ".join(_render(part, root, indent, depth + 1) for part in schema["allOf"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_render({**schema, "type": one}, root, indent, depth) for one in kind)
    if kind in _PRIMITIVES:
        return _PRIMITIVES[kind]
    if kind == "array":
        item = _render(schema.get("items", {}), root, indent, depth + 1)
        return f"({item})[]" if " " in item and not item.startswith("{") else f"{item}[]"
    if kind == "object" or "properties" in schema:
        return _render_object(schema, root, indent, depth)
    return "unknown"


def _render_object(
    schema: Mapping[str, Any], root: Mapping[str, Any], indent: str, depth: int
) -> str:
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    if not properties:
        value = _render(extra, root, indent, depth + 1) if isinstance(extra, Mapping) else "unknown"
        return f"Record<string, {value}>"
    required = set(schema.get("required") or ())
    inner = indent + "  "
    lines = ["{"]
    for name, prop in properties.items():
        resolved = _resolve(prop, root) if isinstance(prop, Mapping) else {}
        doc = str(prop.get("description") or resolved.get("description") or "")
        if isinstance(prop, Mapping) and "default" in prop:
            doc = f"{doc} Default: {json.dumps(prop['default'])}.".strip()
        lines.extend(_doc_comment(doc, inner))
        key = name if _IDENTIFIER.match(name) else json.dumps(name)
        optional = "" if name in required else "?"
        lines.append(f"{inner}{key}{optional}: {_render(prop, root, inner, depth + 1)};")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _result_type(item: Tool) -> str:
    try:
        hint = typing.get_type_hints(item.fn).get("return")
    except Exception:  # unresolvable annotations: the model is told nothing about the result
        return "unknown"
    if hint is None or hint is Any:
        return "unknown"
    if hint is type(None):
        return "void"
    try:
        from pydantic import TypeAdapter

        schema = TypeAdapter(hint).json_schema()
    except Exception:  # a type pydantic cannot describe
        return "unknown"
    return _inline(_render(schema, schema, "", 0))


def _inline(rendered: str) -> str:
    """A result type on one line: `{ room: string; target_c: number }`."""
    lines = [line.strip() for line in rendered.splitlines()]
    lines = [line for line in lines if not line.startswith("/**")]
    return " ".join(lines).replace("; }", " }")
