"""Group "schedules": an agent's schedules and queue (list, cancel), its dead-lettered queue
items (inspect, replay), and the MQTT messages given up on (inspect, replay: as
`gatewayd dead-letters`)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from gatewayd.cluster.operations import (
    CancelSchedule,
    ListQueue,
    ListSchedules,
    RemoveQueueItem,
    RequeueDeadItem,
)
from gatewayd.mcp.catalog import GroupContext, ServedTool
from gatewayd.mcp.groups.common import (
    agent_label,
    clip,
    existing_agent,
    require_all_classes,
)
from gatewayd.mcp.jsonable import jsonable
from gatewayd.tools import ToolError, tool_from_function


def tools(context: GroupContext) -> list[ServedTool]:
    runtime = context.runtime

    async def schedules_list(agent_class: str, agent_id: str, limit: int = 50) -> dict[str, Any]:
        """An agent's schedules (delayed, at, cron, interval): method, payload, next due time
        (epoch seconds), failed attempts.

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id.
            limit: At most this many schedules.
        """
        await existing_agent(context, agent_class, agent_id)
        found = await runtime.run_in_agent(agent_class, agent_id, ListSchedules())
        shown, more = clip(jsonable(found), limit, context.max_items)
        return {"schedules": shown, "truncated": more}

    async def schedule_cancel(agent_class: str, agent_id: str, schedule_id: str) -> dict[str, Any]:
        """Cancel one schedule of an agent.

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id.
            schedule_id: The schedule's id (schedules_list shows them).
        """
        await existing_agent(context, agent_class, agent_id)
        cancelled = await runtime.run_in_agent(agent_class, agent_id, CancelSchedule(schedule_id))
        if not cancelled:
            raise ToolError(f"{agent_label(agent_class, agent_id)} has no schedule {schedule_id!r}")
        return {"cancelled": schedule_id}

    async def queue_list(
        agent_class: str,
        agent_id: str,
        status: Literal["pending", "dead"] | None = "pending",
        limit: int = 50,
    ) -> dict[str, Any]:
        """An agent's queued method calls: pending ones, or dead letters (items that kept
        failing, with their last error), or both (status null).

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id.
            status: "pending", "dead", or null for both.
            limit: At most this many items.
        """
        await existing_agent(context, agent_class, agent_id)
        found = await runtime.run_in_agent(agent_class, agent_id, ListQueue(status))
        shown, more = clip(jsonable(found), limit, context.max_items)
        return {"items": shown, "truncated": more}

    async def queue_item_cancel(agent_class: str, agent_id: str, item_id: str) -> dict[str, Any]:
        """Remove one queued call (pending or dead) from an agent's queue.

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id.
            item_id: The item's id (queue_list shows them).
        """
        await existing_agent(context, agent_class, agent_id)
        removed = await runtime.run_in_agent(agent_class, agent_id, RemoveQueueItem(item_id))
        if not removed:
            raise ToolError(f"{agent_label(agent_class, agent_id)} has no queue item {item_id!r}")
        return {"removed": item_id}

    async def queue_dead_letter_replay(
        agent_class: str, agent_id: str, item_id: str
    ) -> dict[str, Any]:
        """Give a dead-lettered queue item a new life: back at the end of the agent's queue,
        with its attempts reset; it runs as soon as the agent's queue drains.

        Args:
            agent_class: The agent's class.
            agent_id: The agent's id.
            item_id: The dead item's id (queue_list with status "dead").
        """
        await existing_agent(context, agent_class, agent_id)
        if not await runtime.run_in_agent(agent_class, agent_id, RequeueDeadItem(item_id)):
            raise ToolError(
                f"{agent_label(agent_class, agent_id)} has no dead queue item {item_id!r}"
            )
        return {"requeued": item_id}

    async def mqtt_dead_letters_list(limit: int = 50) -> dict[str, Any]:
        """MQTT messages the gateway gave up on (their turn failed mqtt.max_attempts times):
        id, topic, error, attempts, payload preview.

        Args:
            limit: At most this many.
        """
        require_all_classes("mqtt_dead_letters_list")
        letters = await asyncio.to_thread(_dead_letter_store(context).list)
        rows = [
            {
                "id": letter.id,
                "topic": letter.topic,
                "error": letter.error,
                "attempts": letter.attempts,
                "first_failed_at": letter.first_failed_at,
                "last_failed_at": letter.last_failed_at,
                "payload": jsonable(letter.payload[:512]),
                "payload_bytes": len(letter.payload),
            }
            for letter in letters
        ]
        shown, more = clip(rows, limit, context.max_items)
        return {"dead_letters": shown, "truncated": more}

    async def mqtt_dead_letters_replay(ids: list[int]) -> dict[str, Any]:
        """Republish MQTT dead letters to their topics on the configured broker (the gateway
        receives them again); each is deleted once the broker acknowledged it.

        Args:
            ids: The dead letters' ids (mqtt_dead_letters_list shows them).
        """
        require_all_classes("mqtt_dead_letters_replay")
        if not ids:
            raise ToolError("mqtt_dead_letters_replay: give at least one id")
        from gatewayd.wiring import mqtt_settings
        from protocols.mqtt_replay import replay_dead_letters

        result = await replay_dead_letters(
            mqtt_settings(context.config.mqtt), _dead_letter_store(context), ids
        )
        if result.error is not None:
            raise ToolError(
                f"replay stopped: {result.error} (replayed {result.replayed}, left {result.left})"
            )
        return {"replayed": result.replayed, "missing": result.missing}

    classed = {"class_arg": "agent_class"}
    return [
        ServedTool(tool_from_function(schedules_list, read_only=True), "schedules", **classed),
        ServedTool(tool_from_function(schedule_cancel), "schedules", **classed),
        ServedTool(tool_from_function(queue_list, read_only=True), "schedules", **classed),
        ServedTool(tool_from_function(queue_item_cancel), "schedules", **classed),
        ServedTool(tool_from_function(queue_dead_letter_replay), "schedules", **classed),
        ServedTool(tool_from_function(mqtt_dead_letters_list, read_only=True), "schedules"),
        ServedTool(tool_from_function(mqtt_dead_letters_replay), "schedules"),
    ]


def _dead_letter_store(context: GroupContext) -> Any:
    from gatewayd.wiring import mqtt_dead_letters_path
    from protocols.dead_letters import DeadLetterStore

    return DeadLetterStore(mqtt_dead_letters_path(context.config))
