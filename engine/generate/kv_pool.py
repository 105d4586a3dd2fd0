"""Paged KV memory: one pool of fixed-size blocks allocated at start-up, a block table per
sequence (vLLM's layout, on the host).

Per layer the pool holds keys and values as [blocks * block_size, kv_heads, head_dim]; a
token's *slot* is block * block_size + offset. Block 0 is reserved and stays zero: padding
slots of a batch point at it, so gathered padding is finite (and masked by the bias). Blocks
carry a reference count, so a later prefix cache can share them between sequences.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from engine.generate.decoder_io import new_key, new_value
from engine.generate.gguf_model import LlamaConfig

F32 = NDArray[np.float32]
PAD_SLOT = 0  # slot 0 of the reserved block 0


class PoolExhausted(Exception):
    """No free block: the caller should have checked `free_blocks` first."""


class BlockPool:
    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, config.n_kv_heads, config.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self._free = list(range(num_blocks - 1, 0, -1))  # popped from the end: lowest first
        self._refs = np.zeros(num_blocks, np.int32)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhausted("no free KV block")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def release(self, block: int) -> None:
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)


class BlockTable:
    """One sequence's blocks, in order, and how many tokens they hold."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0

    def blocks_needed(self, new_tokens: int) -> int:
        return max(0, self.pool.blocks_for(self.length + new_tokens) - len(self.blocks))

    def slots(self, start: int, stop: int) -> NDArray[np.int64]:
        positions = np.arange(start, stop)
        blocks = np.asarray(self.blocks, np.int64)
        return blocks[positions // self.pool.block_size] * self.pool.block_size + (
            positions % self.pool.block_size
        )

    def store(self, outputs: dict[str, F32], row: int, n: int) -> None:
        """Append the first `n` new tokens of batch row `row`, taking blocks as needed."""
        for _ in range(self.blocks_needed(n)):
            self.blocks.append(self.pool.allocate())
        slots = self.slots(self.length, self.length + n)
        for i in range(len(self.pool.keys)):
            self.pool.keys[i][slots] = outputs[new_key(i)][row, :n]
            self.pool.values[i][slots] = outputs[new_value(i)][row, :n]
        self.length += n

    def free(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.length = [], 0
