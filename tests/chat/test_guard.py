"""The row size guard: any message fits in a row; the biggest content goes first."""

from __future__ import annotations

import json

from gatewayd.chat.guard import MAX_MESSAGE_BYTES, encoded_size, guard_message

MB = 1_000_000


def tool(call_id: str, output: object) -> dict:
    return {
        "type": "tool",
        "toolCallId": call_id,
        "toolName": "read_log",
        "state": "output-available",
        "input": {},
        "output": output,
    }


def test_a_small_message_is_returned_as_is():
    message = {"id": "m", "role": "assistant", "parts": [{"type": "text", "text": "hi"}]}
    assert guard_message(message) is message


def test_a_3_mb_tool_output_is_compacted_to_a_note_and_preview_and_recorded():
    message = {
        "id": "m",
        "role": "assistant",
        "parts": [
            {"type": "text", "text": "the log:"},
            tool("c1", "x" * (3 * MB)),
            tool("c2", "ok"),
        ],
    }
    stored = guard_message(message)
    assert encoded_size(stored) <= MAX_MESSAGE_BYTES
    assert stored["metadata"]["compactedToolOutputs"] == ["c1"]
    assert "too large to store" in stored["parts"][1]["output"]
    assert stored["parts"][1]["output"].endswith("x" * 500)
    assert stored["parts"][2]["output"] == "ok" and stored["parts"][0]["text"] == "the log:"
    assert len(message["parts"][1]["output"]) == 3 * MB  # the caller's copy is untouched


def test_text_is_compacted_after_tool_outputs_and_bytes_count_not_characters():
    # 700k three-byte characters: 2.1 MB of UTF-8 although only 700k characters.
    message = {"id": "m", "role": "user", "parts": [{"type": "text", "text": "€" * 700_000}]}
    stored = guard_message(message)
    assert encoded_size(stored) <= MAX_MESSAGE_BYTES
    assert stored["metadata"]["compactedTextParts"] == [0]


def test_reasoning_file_and_data_parts_cannot_make_a_write_fail():
    message = {
        "id": "m",
        "role": "assistant",
        "parts": [
            {"type": "reasoning", "text": "r" * MB},
            {"type": "file", "url": "data:image/png;base64," + "A" * MB, "mediaType": "image/png"},
            {"type": "data-trace", "id": "t", "data": {"rows": ["y" * 1000] * 1000}},
        ],
    }
    stored = guard_message(message)
    assert encoded_size(stored) <= MAX_MESSAGE_BYTES
    assert set(stored["metadata"]["compactedParts"]) <= {0, 1, 2}
    assert [p["type"] for p in stored["parts"]] == ["reasoning", "file", "data-trace"]


def test_many_small_parts_still_fit_with_a_note_saying_what_was_dropped():
    parts = [{"type": "text", "text": "z" * 900} for _ in range(3000)]
    stored = guard_message({"id": "m", "role": "assistant", "parts": parts})
    assert encoded_size(stored) <= MAX_MESSAGE_BYTES
    assert stored["metadata"]["droppedParts"] > 0
    assert "dropped" in stored["parts"][-1]["text"]
    json.dumps(stored)
