"""Group "models": the models the gateway serves, and one inference run on the engine."""

from __future__ import annotations

from typing import Any

from gatewayd.mcp.catalog import GroupContext, ServedTool
from gatewayd.mcp.jsonable import jsonable
from gatewayd.tools import ToolError, tool_from_function


def tools(context: GroupContext) -> list[ServedTool]:
    engine = context.engine

    async def models_list() -> dict[str, Any]:
        """The models the gateway serves: batched inference models (inputs, outputs, provider)
        and text-generation models."""
        models = []
        if engine is not None:
            for name in engine.model_names():
                entry: dict[str, Any] = {"name": name, "kind": "inference"}
                try:
                    info = engine.model_info(name)
                except Exception as err:  # not loaded (yet)
                    entry["error"] = str(err)
                else:
                    entry["provider"] = info.provider
                    entry["inputs"] = [spec.describe() for spec in info.inputs]
                    entry["outputs"] = [spec.describe() for spec in info.outputs]
                models.append(entry)
        models.extend({"name": name, "kind": "generation"} for name in sorted(context.generators))
        return {"models": models}

    async def model_infer(model: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run one inference on a batched model and return its outputs.

        Args:
            model: The model's name (models_list shows them and their inputs).
            inputs: Each input's name mapped to its rows (nested lists; axis 0 is the row).
        """
        import numpy as np

        from engine import EngineError

        if engine is None or model not in engine.model_names():
            raise ToolError(f"no inference model {model!r} (models_list shows them)")
        specs = {spec.name: spec for spec in engine.model_info(model).inputs}
        unknown = set(inputs) - set(specs)
        if unknown:
            raise ToolError(
                f"model {model!r} has no input {', '.join(sorted(unknown))} "
                f"(its inputs: {', '.join(specs)})"
            )
        try:
            arrays = {
                name: np.asarray(rows, dtype=specs[name].dtype) for name, rows in inputs.items()
            }
        except (TypeError, ValueError) as err:
            raise ToolError(f"inputs: {err}") from None
        try:
            outputs = await engine.infer(model, arrays)
        except EngineError as err:
            raise ToolError(str(err)) from None
        return {"outputs": jsonable(outputs)}

    return [
        ServedTool(tool_from_function(models_list, read_only=True), "models"),
        ServedTool(tool_from_function(model_infer, read_only=True), "models"),
    ]
