"""The OpenAI-compatible endpoint on the gateway's local language models (`[generators]`).

    POST /v1/chat/completions   chat (stream: server-sent events ending `data: [DONE]`)
    POST /v1/completions        plain text continuation (stream or not)
    GET  /v1/models             the configured generators; GET /v1/models/{id}: one

Bearer token scope `openai`; each request is logged with the token's name, the model, the
token usage and how it ended. Errors come in OpenAI's shape (`param` names the bad field):
an unknown model is 404 `model_not_found`, a bad body 400. A client that disconnects (or
breaks out of a stream) cancels its generation at once, which frees its sequence and KV
blocks. Priority: the body's `priority` or the `X-Priority` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from engine.generate.errors import GenerateError
from gatewayd.api.openai_schema import ChatCompletionRequest, CompletionRequest
from gatewayd.api.tokens import ApiToken, require_token
from gatewayd.generation import Generation, GenerationError, pick_generator

log = logging.getLogger(__name__)

SCOPE = "openai"
PRIORITY_HEADER = "x-priority"
DEFAULT_MAX_TOKENS = 1024  # when the generator's section is not known (app built without config)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

T = TypeVar("T")
# The engine's finish reasons that OpenAI's clients do not know: a deadline cut the answer short.
FINISH_REASONS = {"deadline": "length"}


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type: str = "invalid_request_error",
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _validation_error(err: ValidationError) -> JSONResponse:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unrecognized request argument (not supported by this gateway)"
    elif first["type"] == "missing":
        message = "required"
    return openai_error(400, f"{param}: {message}" if param else message, param=param)


async def _read_body(request: Request, model: type[T]) -> T | Response:
    try:
        data = json.loads(await request.body())
    except ClientDisconnect:
        return Response(status_code=499)  # gone before its request was read: nothing to do
    except ValueError as err:
        return openai_error(400, f"the request body is not valid JSON: {err}")
    if not isinstance(data, dict):
        return openai_error(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)  # type: ignore[attr-defined, no-any-return]
    except ValidationError as err:
        return _validation_error(err)


def _header_priority(request: Request) -> int | JSONResponse | None:
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return openai_error(
            400, f"X-Priority: expected an integer, found {raw!r}", param="priority"
        )


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(awaitable: Awaitable[T], receive: Receive) -> T:
    """`awaitable`'s result; `ClientGone` (and `awaitable` cancelled) if the client leaves
    first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if watch.done() and not watch.cancelled() and watch.exception() is not None:
        log.debug("openai: watching for a disconnect failed", exc_info=watch.exception())
    if work.cancelled():
        raise ClientGone
    return work.result()


class EventStream(StreamingResponse):
    """Server-sent events from `events` (each already `data: ...\\n\\n`); when the client
    disconnects, `events` is cancelled and closed at once (not at its next chunk)."""

    def __init__(self, events: AsyncIterator[bytes], on_end: Any) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.events = events
        self.on_end = on_end  # called with "done", "disconnected" or "error"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def produce() -> None:
            async with contextlib.aclosing(self.events) as events:  # type: ignore[type-var]
                async for chunk in events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        outcome = "error"
        try:
            await _unless_disconnected(produce(), receive)
            outcome = "done"
        except (ClientGone, OSError):
            outcome = "disconnected"
        finally:
            self.on_end(outcome)


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _Call:
    """One chat or text completion: the parsed body, its generation, the response."""

    def __init__(
        self,
        request: Request,
        token: ApiToken,
        body: ChatCompletionRequest | CompletionRequest,
        generation: Generation,
    ) -> None:
        self.request = request
        self.token = token
        self.body = body
        self.generation = generation
        self.chat = isinstance(body, ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started = time.perf_counter()

    def log_end(self, outcome: str) -> None:
        generation = self.generation
        try:
            usage = generation.usage
            tokens = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
            }
        except Exception:
            tokens = {}
        log.info(
            "openai: %s %s",
            "chat completion" if self.chat else "completion",
            outcome,
            extra={
                "fields": {
                    "token": self.token.name,
                    "model": generation.model,
                    "stream": self.body.stream,
                    "finish_reason": generation.finish_reason,
                    **tokens,
                    "seconds": f"{time.perf_counter() - self.started:.3f}",
                }
            },
        )

    def _usage(self) -> dict[str, int]:
        usage = self.generation.usage
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        }

    def _envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        obj = (
            ("chat.completion.chunk" if self.body.stream else "chat.completion")
            if self.chat
            else "text_completion"
        )
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.generation.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }

    def _choice(
        self, text: str | None, finish_reason: str | None, *, role: bool = False
    ) -> dict[str, Any]:
        if finish_reason is not None:
            finish_reason = FINISH_REASONS.get(finish_reason, finish_reason)
        if not self.chat:
            return {
                "index": 0,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        if self.body.stream:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text or "", "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    async def complete(self) -> Response:
        """The whole answer as one JSON object (the generation cancelled if the client
        leaves)."""
        try:
            text = await _unless_disconnected(self.generation.text(), self.request.receive)
        except ClientGone:
            self.log_end("disconnected")
            return Response(status_code=499)
        except (GenerateError, ValueError) as err:
            self.log_end("refused")
            return openai_error(400, str(err))
        self.log_end("done")
        choice = self._choice(text, self.generation.finish_reason)
        return JSONResponse(self._envelope([choice], usage=self._usage()))

    async def stream(self) -> Response:
        """Server-sent events. The first delta is awaited before the 200 goes out, so a
        prompt the engine refuses (too long for the context) is still an HTTP error."""
        try:
            first = await _unless_disconnected(anext(self.generation), self.request.receive)
        except ClientGone:
            self.log_end("disconnected")
            return Response(status_code=499)
        except StopAsyncIteration:
            first = None
        except (GenerateError, ValueError) as err:
            self.log_end("refused")
            return openai_error(400, str(err))
        return EventStream(self._events(first), self.log_end)

    async def _events(self, first: Any) -> AsyncIterator[bytes]:
        include_usage = self.body.include_usage()
        extra = {"usage": None} if include_usage else {}
        if self.chat:
            yield _sse(self._envelope([self._choice("", None, role=True)], **extra))
        try:
            delta = first
            while delta is not None:
                reason = delta.finish_reason
                if delta.text or reason is None:
                    yield _sse(self._envelope([self._choice(delta.text, None)], **extra))
                if reason is not None:
                    final = self._choice(None if self.chat else "", reason)
                    yield _sse(self._envelope([final], **extra))
                delta = await anext(self.generation, None)
        except (GenerateError, ValueError) as err:  # mid-stream: the status is already sent
            log.warning("openai: generation failed mid-stream: %s", err)
            yield _sse(
                {
                    "error": {
                        "message": str(err),
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            )
            return
        finally:
            await self.generation.aclose()
        if include_usage:
            yield _sse(self._envelope([], usage=self._usage()))
        yield b"data: [DONE]\n\n"


def _max_tokens(request: Request, model: str, asked: int | None, fallback: int) -> int:
    if asked is not None:
        return asked
    config = getattr(request.app.state.components, "config", None)
    section = getattr(config, "generators", {}).get(model)
    return fallback if section is None else int(section.max_tokens)


async def _generate(
    request: Request, kind: type[ChatCompletionRequest] | type[CompletionRequest]
) -> Response:
    token = require_token(request, SCOPE)
    body = await _read_body(request, kind)
    if isinstance(body, Response):
        return body
    priority = _header_priority(request)
    if isinstance(priority, Response):
        return priority
    generators = _generators(request)
    try:
        name, generator = pick_generator(generators, body.model)
        if isinstance(body, ChatCompletionRequest):
            prompt: Any = body.engine_messages()
            max_tokens = _max_tokens(request, name, body.requested_max_tokens(), DEFAULT_MAX_TOKENS)
        else:
            prompt = body.text()
            max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        generation = Generation(generator, name, prompt, **body.sampling(max_tokens, priority))
    except GenerationError as err:
        status = 404 if err.code == "model_not_found" else 400
        return openai_error(status, err.message, param=err.param, code=err.code)
    call = _Call(request, token, body, generation)
    return await (call.stream() if body.stream else call.complete())


def _generators(request: Request) -> dict[str, Any]:
    return dict(getattr(request.app.state.components, "generators", None) or {})


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest)


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest)


def _model_card(name: str, generator: Any) -> dict[str, Any]:
    created = int(getattr(generator, "created", 0) or 0)
    return {"id": name, "object": "model", "created": created, "owned_by": "gatewayd"}


async def list_models(request: Request) -> Response:
    require_token(request, SCOPE)
    cards = [_model_card(name, g) for name, g in _generators(request).items()]
    return JSONResponse({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    require_token(request, SCOPE)
    name = request.path_params["model"]
    generators = _generators(request)
    if name not in generators:
        return openai_error(
            404,
            f"the model {name!r} does not exist on this gateway",
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_card(name, generators[name]))


def routes(components: Any) -> list[BaseRoute]:
    """The routes, when the gateway has generators (else the feature is off: no routes)."""
    if not getattr(components, "generators", None):
        return []
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]
