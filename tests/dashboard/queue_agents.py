"""An agent with a queue whose items can die, for the dashboard's API tests."""

from __future__ import annotations

from typing import Any, ClassVar

from gatewayd.agents import Agent, callable


class Worker(Agent):
    """`enqueue(x)` queues `work(x)`; while `failing`, work raises (one attempt, then dead)."""

    initial_state: ClassVar[dict[str, Any]] = {"failing": True, "done": []}

    @callable
    def enqueue(self, payload: str) -> str:
        item = self.queue("work", payload, retry={"max_attempts": 1})
        return str(item.id)

    @callable
    def heal(self) -> None:
        self.set_state({**self.state, "failing": False})

    def work(self, payload: str) -> None:
        if self.state["failing"]:
            raise ValueError(f"cannot do {payload} yet")
        self.set_state({**self.state, "done": [*self.state["done"], payload]})
