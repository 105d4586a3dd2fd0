"""`[chat.backends.NAME]` and `[chat.agents.CLASS]`: parsed, checked, applied to the classes."""

from __future__ import annotations

import re

import pytest

from gatewayd.chat import ChatAgent, EchoBackend
from gatewayd.chat.config import ChatConfigError, configure_chat_classes
from gatewayd.chat.local import LocalBackend
from gatewayd.config import ConfigError, parse_config


class Assistant(ChatAgent):
    system_prompt = "from the class"


def config(chat: dict) -> dict:
    return {"agents": {"classes": {"assistant": {"class": "tests.chat.test_chat_config:Assistant"}}},
            "chat": chat}  # fmt: skip


def test_each_configured_class_gets_its_backend_prompt_and_step_limit():
    parsed = parse_config(
        config(
            {
                "backends": {
                    "box": {"kind": "local", "generator": "smollm2", "max_tokens": 64},
                    "echo": {"kind": "echo"},
                },
                "agents": {
                    "assistant": {"backend": "box", "system_prompt": "Be brief.", "max_steps": 4}
                },
            }
        )
    )
    generator = object()
    classes = configure_chat_classes({"assistant": Assistant}, parsed.chat, {"smollm2": generator})
    served = classes["assistant"]
    assert issubclass(served, Assistant) and served is not Assistant
    assert served.system_prompt == "Be brief." and served.max_steps == 4
    assert isinstance(served.backend, LocalBackend) and served.backend.max_tokens == 64
    assert served.backend.generator() is generator
    assert Assistant.backend is None and Assistant.system_prompt == "from the class"  # untouched


def test_a_missing_generator_is_named_when_the_backend_is_used():
    parsed = parse_config(
        config(
            {
                "backends": {"box": {"kind": "local", "generator": "nope"}},
                "agents": {"assistant": {"backend": "box"}},
            }
        )
    )
    served = configure_chat_classes({"assistant": Assistant}, parsed.chat, {})["assistant"]
    with pytest.raises(
        ChatConfigError, match=r"chat\.backends\.box\.generator: no generator named 'nope'"
    ):
        served.backend.generator()


@pytest.mark.parametrize(
    ("chat", "problem"),
    [
        ({"backends": {"b": {"kind": "openai", "model": "m"}}}, "needs base_url and model"),
        ({"backends": {"b": {"kind": "local"}}}, "needs generator"),
        ({"backends": {"b": {"kind": "gpt"}}}, "kind"),
        ({"agents": {"assistant": {"backend": "nope"}}}, "chat.agents.assistant.backend: no backend named 'nope'"),
        ({"backends": {"e": {"kind": "echo"}}, "agents": {"ghost": {"backend": "e"}}},
         "chat.agents.ghost: no agent class named 'ghost'"),
        ({"backends": {"e": {"kind": "echo"}}, "agents": {"assistant": {"backend": "e", "max_steps": 0}}},
         "max_steps"),
    ],
)  # fmt: skip
def test_bad_chat_config_is_refused_with_the_key(chat, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_config(config(chat))


def test_a_class_that_is_not_a_chat_agent_is_refused():
    from gatewayd.agents import Agent

    parsed = parse_config(
        config({"backends": {"e": {"kind": "echo"}}, "agents": {"assistant": {"backend": "e"}}})
    )
    with pytest.raises(ChatConfigError, match=r"chat\.agents\.assistant: .* is not a ChatAgent"):
        configure_chat_classes({"assistant": Agent}, parsed.chat, {})
    classes = configure_chat_classes({"assistant": Assistant}, parsed.chat, {})
    assert isinstance(classes["assistant"].backend, EchoBackend)
