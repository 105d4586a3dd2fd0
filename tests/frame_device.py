"""A minimal binary-frame device for the TCP listener's tests: the codec over an asyncio stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, Self

from protocols.frames import Frame, FrameDecoder, encode


class ConnectionClosed(ConnectionError):
    """The gateway closed (or reset) the connection."""


class FrameDevice:
    """Sends frames, reads them back one at a time; no HELLO, no rules of its own."""

    timeout_s = 5.0  # how long `recv` waits for bytes unless told otherwise

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.frames: deque[Frame] = deque()

    @classmethod
    async def connect(cls, port: int, **kwargs: Any) -> Self:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, **kwargs)
        return cls(reader, writer)

    def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(encode(f) for f in frames))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout_s: float | None = None) -> Frame:
        while not self.frames:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout_s or self.timeout_s)
            except ConnectionResetError:
                data = b""
            if not data:
                raise ConnectionClosed("gateway closed the connection")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    async def recv_until_closed(self, timeout_s: float | None = None) -> list[Frame]:
        frames = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                frames.append(await self.recv(timeout_s))
        return frames

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
