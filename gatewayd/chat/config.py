"""Chat agents from the TOML config: `[chat.backends.NAME]` and `[chat.agents.CLASS]`.

    classes = configure_chat_classes(classes, config.chat, generators)

Each `[chat.agents.CLASS]` gives the agent class CLASS (a `ChatAgent`) its backend, system
prompt and step limit: the daemon serves a subclass with those settings (the class in the
module is left as it is). Backends are built once per name and shared by the classes that
name them. The config objects are duck-typed (the daemon's `gatewayd.config` sections): this
module never imports the daemon's assembly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gatewayd.chat.agent import ChatAgent
from gatewayd.chat.backends import EchoBackend, ModelBackend, OpenAICompatibleBackend
from gatewayd.chat.local import LocalBackend


class ChatConfigError(ValueError):
    """A `[chat]` setting that cannot be applied; the message names the key."""


class TextBackend:
    """kind = "scripted": always answers `reply` (a stand-in model for demos and tests)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def stream(self, messages: Any, *, system: Any = None, tools: Any = None) -> Any:
        yield {"type": "start"}
        if self.reply:
            yield {"type": "text-delta", "id": "t0", "delta": self.reply}
        yield {"type": "finish"}


def build_backend(name: str, section: Any, generators: Mapping[str, Any]) -> ModelBackend:
    """The backend `[chat.backends.<name>]` describes. A local backend resolves its
    generator by name when it is first used (generators may start after the agents)."""
    kind = section.kind
    if kind == "openai":
        backend: Any = OpenAICompatibleBackend(
            base_url=section.base_url,
            model=section.model,
            api_key_file=section.api_key_file,
            timeout_s=section.timeout,
            tool_calls=section.tool_calls,
        )
        return backend
    if kind == "local":
        wanted = section.generator

        def resolve() -> Any:
            generator = generators.get(wanted)
            if generator is None:
                known = ", ".join(sorted(generators)) or "none"
                raise ChatConfigError(
                    f"chat.backends.{name}.generator: no generator named {wanted!r} is "
                    f"running (known: {known}; declare it as [generators.{wanted}])"
                )
            return generator

        return LocalBackend(
            resolve,
            max_tokens=section.max_tokens,
            temperature=section.temperature,
            top_p=section.top_p,
            top_k=section.top_k,
        )
    if kind == "echo":
        return EchoBackend()
    if kind == "scripted":
        return TextBackend(section.reply)
    raise ChatConfigError(f"chat.backends.{name}.kind: unknown kind {kind!r}")


def configure_chat_classes(
    classes: Mapping[str, type],
    chat: Any,
    generators: Mapping[str, Any],
    code_executor: Callable[[], Any] | None = None,
) -> dict[str, type]:
    """`classes` with each `[chat.agents.CLASS]` replaced by a configured subclass; with
    `code_executor` (called once, only if a class needs it), each chat class in Code Mode
    without an executor of its own gets that one."""
    out = dict(classes)
    if chat is not None and chat.agents:
        _apply_chat_sections(out, chat, generators)
    if code_executor is not None:
        executor = None
        for class_name, cls in out.items():
            if (
                isinstance(cls, type)
                and issubclass(cls, ChatAgent)
                and cls.code_mode
                and cls.code_executor is None
            ):
                executor = executor or code_executor()
                out[class_name] = type(
                    cls.__name__,
                    (cls,),
                    {
                        "code_executor": executor,
                        "__module__": cls.__module__,
                        "__qualname__": cls.__qualname__,
                    },
                )
    return out


def _apply_chat_sections(out: dict[str, type], chat: Any, generators: Mapping[str, Any]) -> None:
    backends = {name: build_backend(name, s, generators) for name, s in chat.backends.items()}
    for class_name, settings in chat.agents.items():
        cls = out.get(class_name)
        if cls is None:
            raise ChatConfigError(
                f"chat.agents.{class_name}: no agent class named {class_name!r} "
                f"(declare it as [agents.classes.{class_name}])"
            )
        if not issubclass(cls, ChatAgent):
            raise ChatConfigError(
                f"chat.agents.{class_name}: {cls.__module__}.{cls.__qualname__} is not a ChatAgent"
            )
        attrs: dict[str, Any] = {
            "backend": backends[settings.backend],
            "max_steps": settings.max_steps,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        if settings.system_prompt is not None:
            attrs["system_prompt"] = settings.system_prompt
        if settings.max_persisted_messages is not None:
            attrs["max_persisted_messages"] = settings.max_persisted_messages
        if settings.code_mode is not None:
            attrs["code_mode"] = settings.code_mode
        out[class_name] = type(cls.__name__, (cls,), attrs)
