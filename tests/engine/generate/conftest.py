"""Fixtures for engine.generate: a tiny random Llama (built per session in milliseconds) and the
real SmolLM2 model (downloaded and converted once into the model cache, for `model` tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.generate import Generator
from engine.generate.build import convert, ensure_model
from tests.engine.generate.tiny_llama import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_gguf: Path) -> Path:
    return convert(tiny_gguf, tiny_gguf.parent / "model")


@pytest.fixture(scope="session")
def tiny_q4_model_dir(tiny_gguf: Path) -> Path:
    return convert(tiny_gguf, tiny_gguf.parent / "model-q4", weights="q4")


@pytest.fixture
def tiny_generator(tiny_model_dir: Path) -> Iterator[Generator]:
    generator = Generator(tiny_model_dir, intra_op_threads=1)
    yield generator
    generator.close()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 directory in the model cache ($GATEWAYD_MODEL_CACHE or
    ~/.cache/gatewayd/models): the first run downloads (~93 MB) and converts (~40 s)."""
    return ensure_model("smollm2", progress=print)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> Iterator[Generator]:
    generator = Generator(smollm2_dir)
    yield generator
    generator.close()
