"""Errors raised by the inference engine.

Every error a caller can see derives from `EngineError`, so a caller that only wants to know
"inference did not happen" catches one class; the subclasses say why.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises to its callers."""


class ModelLoadError(EngineError):
    """A model file is missing, unreadable, corrupt, or unusable by the batcher."""


class UnknownModel(EngineError):
    """`infer()` named a model the engine was not configured with."""


class InvalidInput(EngineError):
    """A request's inputs do not match the model (name, dtype, shape or row count).

    Raised before the request is queued: bad input never reaches ONNX Runtime.
    """


class EngineOverloaded(EngineError):
    """The model's bounded queue is full; the request was rejected without queueing."""


class InferenceTimeout(EngineError):
    """The request's deadline passed while it was still queued; it was never run."""


class InferenceFailed(EngineError):
    """ONNX Runtime raised while running the batch that held this request."""


class EngineNotRunning(EngineError):
    """`infer()` was called before `start()` finished or after `close()` began."""
