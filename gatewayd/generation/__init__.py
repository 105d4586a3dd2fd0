"""Serving local language models (`engine.generate`) inside the daemon.

`prepare` turns a `[generators.NAME]` section into a running `Generator` (fetching and
converting the model once, with progress); `run.Generation` is one generation as the daemon
runs it for the OpenAI-compatible endpoint and for agents' `self.generate(...)`: sampling
parameters checked against what the engine accepts, token usage, Prometheus metrics
(`metrics`, `gatewayd_generate_*`).

Must never import the daemon's assembly (`gatewayd.daemon`, `gatewayd.wiring`, `gatewayd.cli`)
nor the agent runtime; `engine.generate` is imported only where a model is built or run, so
this package loads without the `llm` extra.
"""

from gatewayd.generation.run import Generation, GenerationError, Usage, pick_generator

__all__ = ["Generation", "GenerationError", "Usage", "pick_generator"]
