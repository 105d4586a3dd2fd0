"""The example chat agent: `ws://HOST:PORT/agents/chat/{id}` (frames: protocols/PROTOCOL.md).

It answers with `EchoBackend`, which is not a model (it repeats the last user message word by
word), so the example runs anywhere. Point `backend` at a real model to make it useful:

    backend = OpenAICompatibleBackend(base_url="http://127.0.0.1:8000/v1", model="qwen")
"""

from __future__ import annotations

from gatewayd.chat import ChatAgent, EchoBackend


class EchoChat(ChatAgent):
    system_prompt = "You are the assistant of this site's gateway."
    backend = EchoBackend()
    max_persisted_messages = 1000
