"""Tools -> the TypeScript-style declaration the model reads, and JS-safe names."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel

from gatewayd.codemode import js_name, render_api
from gatewayd.tools import Tool, tool_from_function


class Reading(BaseModel):
    room: str
    temperature_c: float


class Where(BaseModel):
    floor: int
    wing: Literal["east", "west"] | None = None


async def read(room: str) -> Reading:
    """Read one room's thermostat.

    Args:
        room: The room's name, as on the floor plan.
    """
    return Reading(room=room, temperature_c=20)


async def move(device: str, where: Where, tags: list[str] | None = None) -> None:
    """Move a device. Says */ in its docstring."""


async def everything() -> list[str]:
    """List every room."""
    return []


def test_declaration_with_doc_comments_types_and_results() -> None:
    tools = [
        tool_from_function(everything),
        tool_from_function(read),
        tool_from_function(move, name="devices.move-one", needs_approval=True),
    ]
    assert render_api(tools) == (
        "declare const codemode: {\n"
        "  /** List every room. */\n"
        "  everything(input?: {}): Promise<string[]>;\n"
        "  /** Read one room's thermostat. */\n"
        "  read(input: {\n"
        "    /** The room's name, as on the floor plan. */\n"
        "    room: string;\n"
        "  }): Promise<{ room: string; temperature_c: number }>;\n"
        "  /**\n"
        "   * Move a device. Says *\\/ in its docstring.\n"
        "   * Needs a person's approval: the call waits until they answer.\n"
        "   */\n"
        "  devices_move_one(input: {\n"
        "    device: string;\n"
        "    where: {\n"
        "      floor: number;\n"
        "      /** Default: null. */\n"
        '      wing?: "east" | "west" | null;\n'
        "    };\n"
        "    /** Default: null. */\n"
        "    tags?: string[] | null;\n"
        "  }): Promise<void>;\n"
        "};"
    )


def test_hand_written_schemas_render_too() -> None:
    schema = {
        "type": "object",
        "properties": {
            "not-an-identifier": {"type": ["string", "null"]},
            "mode": {"const": "fast"},
            "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "either": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
        },
        "required": ["mode"],
    }
    made = Tool("raw", "A raw tool.", schema, fn=lambda **_: None)
    rendered = render_api([made])
    assert '"not-an-identifier"?: string | null;' in rendered
    assert 'mode: "fast";' in rendered
    assert "matrix?: number[][];" in rendered
    assert "labels?: Record<string, string>;" in rendered
    assert "either?: number | boolean;" in rendered
    assert "): Promise<unknown>;" in rendered


@pytest.mark.parametrize(
    ("name", "ident"),
    [
        ("my-server.list-items", "my_server_list_items"),
        ("delete", "delete_"),
        ("new", "new_"),
        ("3d_print", "_3d_print"),
        ("plain_name", "plain_name"),
    ],
)
def test_names_become_javascript_identifiers(name: str, ident: str) -> None:
    assert js_name(name) == ident


def test_two_tools_with_the_same_javascript_name_are_refused() -> None:
    one = Tool("a.b", "x", {"type": "object"}, fn=lambda: None)
    two = Tool("a-b", "x", {"type": "object"}, fn=lambda: None)
    with pytest.raises(ValueError, match=r"'a\.b' and 'a-b' both become codemode\.a_b"):
        render_api([one, two])
