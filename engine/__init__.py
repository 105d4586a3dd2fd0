"""engine: batched local inference on ONNX Runtime.

Knows nothing of agents or transports: must never import `gatewayd` or `protocols`.

    from engine import Engine, ModelSpec
    engine = Engine([ModelSpec("anomaly", Path("engine/models/anomaly.onnx"))])
    await engine.start()
    result = await engine.infer("anomaly", windows)   # {"score": ..., "reconstruction": ...}
"""

from engine.engine import Engine, ModelInfo
from engine.errors import (
    EngineError,
    EngineNotRunning,
    EngineOverloaded,
    InferenceFailed,
    InferenceTimeout,
    InvalidInput,
    ModelLoadError,
    UnknownModel,
)
from engine.io import TensorSpec
from engine.spec import ModelSpec

__all__ = [
    "Engine",
    "EngineError",
    "EngineNotRunning",
    "EngineOverloaded",
    "InferenceFailed",
    "InferenceTimeout",
    "InvalidInput",
    "ModelInfo",
    "ModelLoadError",
    "ModelSpec",
    "TensorSpec",
    "UnknownModel",
]
