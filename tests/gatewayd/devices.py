"""A binary-frame device for end-to-end tests, behaving as FRAMES.md asks of firmware."""

from __future__ import annotations

import asyncio
from collections import deque

from protocols.frames import Ack, FrameDecoder, Hello, HelloOk, Push, encode


class TcpDevice:
    """A binary-frame device: HELLO, pipelined DATA with a persistent seq, resend after reconnect."""

    def __init__(self, port: int, device_id: str, secret: str) -> None:
        self.port, self.device_id, self.secret = port, device_id, secret
        self.received: list[object] = []

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.decoder = FrameDecoder()
        self.pending: deque[object] = deque()
        self.writer.write(encode(Hello(self.device_id, self.secret)))
        assert isinstance(await self.next_frame(), HelloOk)

    async def next_frame(self) -> object:
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                raise ConnectionError("gateway closed the connection")
            self.pending.extend(self.decoder.feed(data))
        frame = self.pending.popleft()
        self.received.append(frame)
        if isinstance(frame, Push):
            self.writer.write(encode(Ack(frame.seq)))  # firmware acknowledges every push
        return frame
