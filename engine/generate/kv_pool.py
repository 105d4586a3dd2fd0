"""Paged KV memory: one pool of fixed-size blocks allocated at start-up, a block table per
sequence (vLLM's layout, on the host).

Per layer the pool holds keys and values as [kv_heads, blocks, block_size, head_dim], the
layout the decoder graph reads in place (it gathers a row's blocks on axis 1: no copy on the
host, no transpose in the graph); a token's *slot* is block * block_size + offset, its index
in the flat [kv_heads, blocks * block_size, head_dim] view. Block 0 is reserved and stays zero:
padding columns of a block table point at it, so gathered padding is finite (and masked).

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
        shape = (config.n_kv_heads, num_blocks, block_size, config.head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self._free = list(range(num_blocks - 1, 0, -1))  # popped from the end: lowest first
        self._refs = np.zeros(num_blocks, np.int32)
        self._prefixes: OrderedDict[bytes, int] = OrderedDict()  # token prefix -> block, LRU
        self.prefix_hits = 0  # blocks shared instead of computed
        self.prefix_lookups = 0  # full prompt blocks looked up

    def flat_keys(self, layer: int) -> F32:
        """Layer `layer`'s keys as [kv_heads, slots, head_dim] (a view)."""
        k = self.keys[layer]
        return k.reshape(k.shape[0], -1, k.shape[3])

    def flat_values(self, layer: int) -> F32:
        v = self.values[layer]
        return v.reshape(v.shape[0], -1, v.shape[3])

    def write(
        self,
        outputs: dict[str, F32],
        rows: NDArray[np.int64],
        cols: NDArray[np.int64],
        slots: NDArray[np.int64],
    ) -> None:
        """Store new token j (`outputs[new_key(i)][rows[j], cols[j]]`, [kv_heads, head_dim])
        of every layer i at slot `slots[j]`: one vectorised assignment per layer and kind."""
        for i in range(len(self.keys)):
            self.flat_keys(i)[:, slots] = outputs[new_key(i)][rows, cols].transpose(1, 0, 2)
            self.flat_values(i)[:, slots] = outputs[new_value(i)][rows, cols].transpose(1, 0, 2)

    @property
    def bytes_per_token(self) -> int:
        """KV memory one token takes (every layer, keys and values)."""
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[0] * k.shape[3] * k.itemsize

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

    def reserve(self, tokens: int) -> None:
        """Take blocks now so that the table can hold `tokens` tokens in all."""
        for _ in range(self.pool.blocks_for(tokens) - len(self.blocks)):
            self.blocks.append(self.pool.allocate())

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
        self.reserve(self.length + n)
        slots = self.slots(self.length, self.length + n)
        self.pool.write(outputs, np.full(n, row), np.arange(n), slots)
        self.length += n

    def free(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.length = [], 0
