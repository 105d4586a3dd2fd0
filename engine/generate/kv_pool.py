"""Paged KV memory: one pool of fixed-size blocks allocated at start-up, a block table per
sequence (vLLM's layout, on the host).

Per layer the pool holds keys and values as [blocks * block_size, kv_heads, head_dim]; a
token's *slot* is block * block_size + offset. Block 0 is reserved and stays zero: padding
slots of a batch point at it, so gathered padding is finite (and masked by the bias).

Prefix cache: a block completely filled by prompt tokens is indexed by the whole token prefix
up to its end (exact bytes, no hash collisions), and the index holds a reference to it. A new
sequence whose prompt starts with indexed prefixes shares those blocks (reference counted,
never written again: new tokens go to new blocks) and prefills only the rest. Blocks only
the index holds are *evictable*: taken back, least recently used first, when no block is free.
"""

from __future__ import annotations

from collections import OrderedDict

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
        self._prefixes: OrderedDict[bytes, int] = OrderedDict()  # token prefix -> block, LRU
        self.prefix_hits = 0  # blocks shared instead of computed
        self.prefix_lookups = 0  # full prompt blocks looked up

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def available_blocks(self) -> int:
        """Free blocks plus those only the prefix cache holds (taken back on demand)."""
        return len(self._free) + sum(1 for b in self._prefixes.values() if self._refs[b] == 1)

    @property
    def cached_blocks(self) -> int:
        return len(self._prefixes)

    def clear_prefix_cache(self) -> None:
        for block in self._prefixes.values():
            self.release(block)
        self._prefixes.clear()

    def _evict_one(self) -> bool:
        for key, block in self._prefixes.items():  # oldest first
            if self._refs[block] == 1:
                del self._prefixes[key]
                self.release(block)
                return True
        return False

    @staticmethod
    def _key(tokens: list[int], end: int) -> bytes:
        return np.asarray(tokens[:end], np.int32).tobytes()

    def cached_tokens(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` a `BlockTable.share_prefix` would cover now."""
        count = 0
        while (count + 1) * self.block_size <= len(tokens) - 1:
            if self._key(tokens, (count + 1) * self.block_size) not in self._prefixes:
                break
            count += 1
        return count * self.block_size

    def lookup(self, tokens: list[int], max_blocks: int) -> list[int]:
        """The cached blocks holding the longest indexed prefix of `tokens`, at most
        `max_blocks` of them, each with a new reference for the caller."""
        found: list[int] = []
        for i in range(max_blocks):
            self.prefix_lookups += 1
            block = self._prefixes.get(self._key(tokens, (i + 1) * self.block_size))
            if block is None:
                break
            self._prefixes.move_to_end(self._key(tokens, (i + 1) * self.block_size))
            self._refs[block] += 1
            found.append(block)
        self.prefix_hits += len(found)
        return found

    def remember(self, tokens: list[int], blocks: list[int]) -> None:
        """Index every block that `tokens` (a prompt, stored in `blocks`) fills completely."""
        for i in range(min(len(tokens) // self.block_size, len(blocks))):
            key = self._key(tokens, (i + 1) * self.block_size)
            if key not in self._prefixes:
                self._prefixes[key] = blocks[i]
                self._refs[blocks[i]] += 1

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int:
        if not self._free and not self._evict_one():
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

    def share_prefix(self, tokens: list[int]) -> int:
        """Start an empty table with the cached blocks of `tokens`' longest indexed prefix,
        leaving at least one token to compute; returns how many tokens that covers."""
        assert not self.blocks
        self.blocks = self.pool.lookup(tokens, (len(tokens) - 1) // self.pool.block_size)
        self.length = len(self.blocks) * self.pool.block_size
        return self.length

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
