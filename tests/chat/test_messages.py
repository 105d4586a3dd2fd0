"""Building the assistant message from its stream chunks; data parts reconcile by (type, id)."""

from __future__ import annotations

from gatewayd.chat.messages import MessageBuilder


def build(chunks: list[dict]) -> dict:
    builder = MessageBuilder("m1")
    for chunk in chunks:
        builder.apply(chunk)
    return builder.message


def test_deltas_tool_calls_and_results_become_parts():
    message = build(
        [
            {"type": "start", "metadata": {"model": "x"}},
            {"type": "reasoning-delta", "id": "r", "delta": "think"},
            {"type": "text-delta", "id": "t", "delta": "Hel"},
            {"type": "text-delta", "id": "t", "delta": "lo"},
            {"type": "tool-call", "toolCallId": "c1", "toolName": "heat", "input": {"room": 2}},
            {"type": "tool-result", "toolCallId": "c1", "output": {"ok": True}},
            {"type": "finish"},
        ]
    )
    assert message == {
        "id": "m1",
        "role": "assistant",
        "metadata": {"model": "x"},
        "parts": [
            {"type": "reasoning", "text": "think"},
            {"type": "text", "text": "Hello"},
            {
                "type": "tool",
                "toolCallId": "c1",
                "toolName": "heat",
                "state": "output-available",
                "input": {"room": 2},
                "output": {"ok": True},
            },
        ],
    }


def test_data_parts_replace_by_type_and_id_append_otherwise_and_transient_are_not_kept():
    message = build(
        [
            {"type": "data-weather", "id": "w1", "data": {"status": "loading"}},
            {"type": "data-weather", "id": "w2", "data": {"status": "loading"}},
            {"type": "data-notice", "data": "a"},
            {"type": "data-weather", "id": "w1", "data": {"status": "done", "temp": 4}},
            {"type": "data-notice", "data": "b"},
            {"type": "data-progress", "data": 50, "transient": True},
            {"type": "data-stats", "id": "w1", "data": 1},
        ]
    )
    assert message["parts"] == [
        {"type": "data-weather", "id": "w1", "data": {"status": "done", "temp": 4}},
        {"type": "data-weather", "id": "w2", "data": {"status": "loading"}},
        {"type": "data-notice", "data": "a"},
        {"type": "data-notice", "data": "b"},
        {"type": "data-stats", "id": "w1", "data": 1},
    ]
