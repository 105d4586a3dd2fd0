"""A tiny random-weight Llama for serving tests (the one tests/engine/generate builds, with a
2,048-token context so that a generation can run long enough to be cancelled mid-way), and a
real API server (uvicorn) serving it with the OpenAI-compatible endpoint."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from engine.generate import Generator
from engine.generate.build import convert
from gatewayd.api import ApiServer, ApiToken, Tokens, build_app
from tests.engine.generate import tiny_llama

LONG_CONTEXT = 2048
OPERATOR = ApiToken("operator", "operator-secret-0123456789")
DEVICES_ONLY = ApiToken("devices-only", "devices-secret-0123456789", scopes=frozenset({"mcp"}))


@pytest.fixture(scope="session")
def tiny_gguf_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_llama, "CONTEXT", LONG_CONTEXT)
        return tiny_llama.write_tiny_llama(tmp_path_factory.mktemp("tiny-long") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_dir(tiny_gguf_long: Path) -> Path:
    return convert(tiny_gguf_long, tiny_gguf_long.parent / "model")


@pytest.fixture
def tiny(tiny_dir: Path) -> Iterator[Generator]:
    generator = Generator(tiny_dir, intra_op_threads=1, kv_cache_tokens=4096)
    yield generator
    generator.close()


@contextlib.asynccontextmanager
async def serving(generators: dict[str, Any]) -> AsyncIterator[str]:
    """The real API server on a free port; yields its base URL."""
    components = SimpleNamespace(generators=generators, config=None)
    app, _ = build_app(components, Tokens.of(OPERATOR, DEVICES_ONLY))
    server = ApiServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop(2)


@pytest.fixture
async def base_url(tiny: Generator) -> AsyncIterator[str]:
    async with serving({"tiny": tiny}) as url:
        yield url
