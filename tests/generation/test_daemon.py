"""The daemon serves `[generators]` from its config: the model is prepared at start-up (with
progress lines), chat works through the API with the example token, the metrics show the
generator, a model that cannot be prepared is a start-up error naming it, and (marked
`model`) the real SmolLM2 answers a chat turn in sensible English."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from engine.generate.build import ensure_model
from tests.brokers import free_port
from tests.engine.generate.tiny_llama import write_tiny_llama
from tests.gatewayd.daemon_process import REPO, GatewayProcess
from tests.gatewayd.notify import NotifySocket

EXAMPLE_TOKEN = "gw-example-token-change-me"  # api-tokens.example.toml


class Site:
    """A daemon on an example-style config: the API with the example tokens file, one
    generator `[generators.NAME]` with `source` (e.g. `model = "smollm2"`), nothing else."""

    def __init__(self, tmp_path: Path, notify: NotifySocket, name: str, source: str) -> None:
        self.api_port, self.http_port = free_port(), free_port()
        self.config = tmp_path / "gatewayd.toml"
        self.config.write_text(
            f"""
[gateway]
state_dir = "{tmp_path / "state"}"
[http]
bind = "127.0.0.1:{self.http_port}"
[api]
enabled = true
bind = "127.0.0.1:{self.api_port}"
tokens_file = "{REPO / "api-tokens.example.toml"}"
[listeners.websocket]
enabled = false
[generators.{name}]
{source}
"""
        )
        self.gateway = GatewayProcess(self.config, notify)

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=f"http://127.0.0.1:{self.api_port}/v1", api_key=EXAMPLE_TOKEN, max_retries=0
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=10) as r:
            return str(r.read().decode())


@pytest.fixture
def tiny_site(tmp_path: Path, notify: NotifySocket) -> Iterator[Site]:
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    site = Site(tmp_path, notify, "tiny", f'gguf = "{gguf}"\nmax_tokens = 7')
    try:
        site.gateway.start()
        yield site
    finally:
        assert site.gateway.stop() == 0


async def test_the_daemon_serves_its_generators(tiny_site: Site) -> None:
    log = tiny_site.gateway.log_text()
    assert "generators: converting" in log and "generators: tiny loaded" in log
    async with tiny_site.client() as api:
        assert [m.id for m in (await api.models.list()).data] == ["tiny"]
        reply = await api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}]
        )
    assert reply.usage is not None and reply.usage.completion_tokens == 7, (
        "the section's max_tokens"
    )
    tiny_site.gateway.wait_log("openai: chat completion done")
    line = next(
        x for x in tiny_site.gateway.log_text().splitlines() if "openai: chat completion" in x
    )
    assert "token=example" in line and "model=tiny" in line and "completion_tokens=7" in line
    metrics = tiny_site.metrics()
    assert 'gatewayd_generate_kv_blocks_free{model="tiny"}' in metrics
    assert 'gatewayd_generate_running_sequences{model="tiny"} 0.0' in metrics
    assert 'gatewayd_generate_completion_tokens_total{model="tiny"} 7.0' in metrics


def _run_daemon(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", *args, str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_model_that_cannot_be_prepared_is_a_startup_error(
    tmp_path: Path, notify: NotifySocket
) -> None:
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"GGUF but not really")
    site = Site(tmp_path, notify, "broken", f'gguf = "{garbage}"')
    result = _run_daemon(site.config, "run", "-c")
    assert result.returncode == 1
    assert "start-up failed: generators.broken: cannot prepare the model" in result.stderr


def test_check_config_names_a_bad_generator(tmp_path: Path, notify: NotifySocket) -> None:
    site = Site(tmp_path, notify, "local", f'onnx_dir = "{tmp_path}"')
    with site.config.open("a") as config:
        config.write('[generators.other]\nmodel = "llama-9000"\n')
    result = _run_daemon(site.config, "check-config")
    assert result.returncode == 78
    assert "generators: local: onnx_dir" in result.stderr and "generation.json" in result.stderr
    assert "other: unknown model 'llama-9000'" in result.stderr
    both = Site(tmp_path, notify, "two", 'model = "smollm2"\nonnx_dir = "x"')
    result = _run_daemon(both.config, "check-config")
    assert result.returncode == 78 and "generators.two: give exactly one of model" in result.stderr


@pytest.mark.model
async def test_smollm2_chats_in_english_through_the_daemon(
    tmp_path: Path, notify: NotifySocket
) -> None:
    ensure_model("smollm2", progress=print)  # the model cache, as scripts/test fills it
    site = Site(tmp_path, notify, "smollm2", 'model = "smollm2"')
    site.gateway.start()
    try:
        async with site.client() as api:
            reply = await api.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=40,
                temperature=0,
            )
            stream = await api.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "Name a primary colour."}],
                max_tokens=30,
                stream=True,
            )
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    finally:
        assert site.gateway.stop() == 0
    answer = reply.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert any(c in streamed.lower() for c in ("red", "blue", "yellow", "green")), streamed
