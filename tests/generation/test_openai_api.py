"""The OpenAI-compatible endpoint over real HTTP (uvicorn), driven by the official `openai`
client, on the tiny random-weight Llama: answers equal the engine's own greedy output, usage
counts are the tokenizer's, errors come in OpenAI's shape, and a client that goes away
cancels its generation and frees its sequence."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from prometheus_client import REGISTRY

from engine.generate import Generator
from gatewayd.generation.metrics import generator_stats
from gatewayd.generation.run import accepted_params
from tests.generation.conftest import DEVICES_ONLY, OPERATOR
from tests.waiting import wait_until

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the thermostat."},
]


def client(base_url: str, secret: str = OPERATOR.secret) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key=secret, max_retries=0, timeout=30)


async def engine_text(generator: Generator, prompt: Any, **sampling: Any) -> tuple[str, str]:
    """What the engine itself answers: (text, finish_reason)."""
    text, reason = "", ""
    async for delta in generator.generate(prompt, **sampling):
        text += delta.text
        reason = delta.finish_reason or reason
    return text, reason


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def idle(generator: Generator) -> bool:
    stats = generator_stats(generator)
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0


async def test_chat_completion_is_the_engines_answer_with_usage(
    base_url: str, tiny: Generator
) -> None:
    expected, reason = await engine_text(tiny, MESSAGES, max_tokens=12)
    async with client(base_url) as api:
        reply = await api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected and choice.finish_reason == reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(tiny.encode(tiny.render(MESSAGES)))
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


async def test_chat_completion_stream_with_usage(base_url: str, tiny: Generator) -> None:
    expected, _ = await engine_text(tiny, MESSAGES, max_tokens=10)
    async with client(base_url) as api:
        stream = await api.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_completion_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


async def test_raw_sse_ends_with_done(base_url: str) -> None:
    async with (
        httpx.AsyncClient(base_url=base_url) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True},
            headers={"Authorization": f"Bearer {OPERATOR.secret}"},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join([part async for part in response.aiter_text()])
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


async def test_completions_stream_and_not(base_url: str, tiny: Generator) -> None:
    prompt = "The thermostat says"
    expected, _ = await engine_text(tiny, prompt, max_tokens=16)
    async with client(base_url) as api:
        reply = await api.completions.create(model="tiny", prompt=prompt)  # OpenAI's default: 16
        stream = await api.completions.create(model="tiny", prompt=[prompt], stream=True)
        chunks = [chunk async for chunk in stream]
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    assert reply.usage.prompt_tokens == len(tiny.encode(prompt))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_stop_strings_and_seeds(base_url: str, tiny: Generator) -> None:
    greedy, _ = await engine_text(tiny, "Hello", max_tokens=30)
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    assert stop.strip(), greedy
    async with client(base_url) as api:
        stopped = await api.completions.create(
            model="tiny", prompt="Hello", max_tokens=30, stop=[stop]
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == greedy[: greedy.index(stop)]

        async def sampled(seed: int) -> str:
            reply = await api.completions.create(
                model="tiny", prompt="Hello", max_tokens=20, temperature=1.0, top_p=0.95, seed=seed
            )
            return reply.choices[0].text

        first, again, other = await sampled(7), await sampled(7), await sampled(8)
    assert first == again, "a seed makes sampling reproducible"
    assert first != other and first != greedy[: len(first)]


async def test_models_list_and_one_model(base_url: str) -> None:
    async with client(base_url) as api:
        models = await api.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        assert (await api.models.retrieve("tiny")).owned_by == "gatewayd"
        with pytest.raises(openai.NotFoundError) as missing:
            await api.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


async def test_auth_is_required_and_scoped(base_url: str) -> None:
    async with client(base_url, "not-a-valid-token-at-all") as api:
        with pytest.raises(openai.AuthenticationError) as refused:
            await api.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert refused.value.code == "invalid_token"
    async with client(base_url, DEVICES_ONLY.secret) as api:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await api.models.list()
    assert denied.value.code == "scope_not_allowed" and "openai" in denied.value.message


async def test_unknown_model_is_model_not_found(base_url: str) -> None:
    async with client(base_url) as api:
        with pytest.raises(openai.NotFoundError) as missing:
            await api.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert "tiny" in missing.value.message, "the error says which models exist"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"model": None}, "model"),
    ],
)
async def test_bad_parameters_are_400_naming_the_field(
    base_url: str, body: dict[str, Any], param: str
) -> None:
    async with client(base_url) as api:
        with pytest.raises(openai.BadRequestError) as bad:
            await api.chat.completions.create(
                **{"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **body}
            )
    assert bad.value.param is not None and bad.value.param.startswith(param)
    message = bad.value.body["message"]  # type: ignore[index]
    assert message.startswith(param), message


async def test_not_json_and_a_prompt_too_long_for_the_context(base_url: str) -> None:
    headers = {"Authorization": f"Bearer {OPERATOR.secret}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as http:
        not_json = await http.post("/v1/completions", content=b"{nope")
        assert not_json.status_code == 400
        assert "not valid JSON" in not_json.json()["error"]["message"]
        too_long = await http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hello " * 3000, "stream": True}
        )
    assert too_long.status_code == 400, "refused before the stream starts"
    assert "context" in too_long.json()["error"]["message"]


async def test_priority_and_engine_extensions_pass_through(base_url: str, tiny: Generator) -> None:
    async with client(base_url) as api:
        reply = await api.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=3, extra_headers={"X-Priority": "2"},
            extra_body={"priority": 1, "top_k": 5},
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as bad:
            await api.chat.completions.create(
                model="tiny", messages=MESSAGES, extra_headers={"X-Priority": "high"}
            )
        assert bad.value.param == "priority"
        if "repetition_penalty" in (accepted_params(tiny) or ()):
            await api.chat.completions.create(
                model="tiny",
                messages=MESSAGES,
                max_tokens=3,
                extra_body={"repetition_penalty": 1.3},
            )
        else:  # never sample differently from what was asked: refused, by name
            with pytest.raises(openai.BadRequestError) as unsupported:
                await api.chat.completions.create(
                    model="tiny", messages=MESSAGES, extra_body={"repetition_penalty": 1.3}
                )
            assert unsupported.value.param == "repetition_penalty"


async def test_a_client_that_leaves_a_stream_cancels_its_generation(
    base_url: str, tiny: Generator
) -> None:
    cancelled = sample("gatewayd_generate_requests_total", model="tiny", finish_reason="cancelled")
    generated = sample("gatewayd_generate_completion_tokens_total", model="tiny")
    steps = tiny.decode_steps
    async with client(base_url) as api:
        stream = await api.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=1900, stream=True
        )
        async for chunk in stream:
            if chunk.choices[0].text:
                break  # about 4 s of generation left (2.3 ms a token, 1 core)
        await stream.close()
    await wait_until(lambda: idle(tiny), 10, "the sequence to leave the engine")
    await wait_until(
        lambda: (
            sample("gatewayd_generate_requests_total", model="tiny", finish_reason="cancelled")
            == cancelled + 1
        ),
        5,
        "the request to count as cancelled",
    )
    assert sample("gatewayd_generate_completion_tokens_total", model="tiny") - generated < 1900
    assert tiny.decode_steps - steps < 1000, "the engine stopped decoding it"


async def test_a_client_that_leaves_a_plain_request_cancels_it(
    base_url: str, tiny: Generator
) -> None:
    cancelled = sample("gatewayd_generate_requests_total", model="tiny", finish_reason="cancelled")
    steps = tiny.decode_steps
    async with client(base_url) as api:
        # The client gives up once the engine is decoding its answer (a fixed timeout would
        # be the whole answer on a fast core: 1,900 tokens take well under a second there).
        request = asyncio.ensure_future(
            api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=1900)
        )
        await wait_until(
            lambda: tiny.decode_steps > steps or request.done(), 10, "the engine to decode it"
        )
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_until(
        lambda: (
            sample("gatewayd_generate_requests_total", model="tiny", finish_reason="cancelled")
            == cancelled + 1
        ),
        10,
        "the request to count as cancelled",
    )
    await wait_until(lambda: idle(tiny), 10, "the sequence to leave the engine")
    assert tiny.decode_steps - steps < 1000, "the engine stopped decoding it"


async def test_metrics_count_requests_tokens_and_latency(base_url: str, tiny: Generator) -> None:
    from gatewayd.generation.metrics import COLLECTOR

    before = sample("gatewayd_generate_completion_tokens_total", model="tiny")
    ttft = sample("gatewayd_generate_time_to_first_token_seconds_count", model="tiny")
    COLLECTOR.track("tiny", tiny)
    try:
        async with client(base_url) as api:
            await asyncio.gather(
                *(
                    api.completions.create(model="tiny", prompt=f"reading {i}", max_tokens=5)
                    for i in range(3)
                )
            )
        assert sample("gatewayd_generate_completion_tokens_total", model="tiny") == before + 15
        assert (
            sample("gatewayd_generate_time_to_first_token_seconds_count", model="tiny") == ttft + 3
        )
        assert sample("gatewayd_generate_inter_token_seconds_count", model="tiny") > 0
        assert sample("gatewayd_generate_prompt_tokens_total", model="tiny") > 0
        sampled = {  # None: not exported
            name: REGISTRY.get_sample_value(f"gatewayd_generate_{name}", {"model": "tiny"})
            for name in ("running_sequences", "waiting_sequences", "kv_blocks_free",
                         "kv_blocks_used", "prefix_cache_hit_rate", "preemptions_total")
        }  # fmt: skip
        assert sampled["running_sequences"] == sampled["waiting_sequences"] == 0
        assert sampled["kv_blocks_used"] == 0 and sampled["preemptions_total"] == 0
        assert sampled["kv_blocks_free"] == generator_stats(tiny)["kv_blocks_free"] > 0
        assert sampled["prefix_cache_hit_rate"] is not None
    finally:
        COLLECTOR.untrack("tiny")
