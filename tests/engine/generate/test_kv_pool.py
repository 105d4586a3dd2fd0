"""The KV block pool: slots map tokens into their blocks, blocks are counted and returned,
the reserved zero block is never handed out."""

from __future__ import annotations

import numpy as np
import pytest

from engine.generate.gguf_model import LlamaConfig
from engine.generate.kv_pool import PAD_SLOT, BlockPool, BlockTable, PoolExhausted

CONFIG = LlamaConfig(
    n_layers=2, d_model=8, d_ff=16, n_heads=2, n_kv_heads=1, vocab_size=10,
    context_length=64, rope_freq_base=10000.0, rms_norm_eps=1e-5,
)  # fmt: skip


def outputs(n: int, value: float) -> dict[str, np.ndarray]:
    new = (
        np.full((1, n, 1, 4), value, np.float32)
        + np.arange(n, dtype=np.float32)[None, :, None, None]
    )
    return {f"new_{kind}.{i}": new for kind in ("key", "value") for i in range(2)}


def test_tokens_land_in_their_blocks_and_the_pool_gets_them_back() -> None:
    pool = BlockPool(CONFIG, num_blocks=5, block_size=4)
    assert pool.usable_blocks == 4 and pool.free_blocks == 4
    table = BlockTable(pool)
    table.store(outputs(6, 100.0), row=0, n=6)  # two blocks
    table.store(outputs(1, 200.0), row=0, n=1)
    assert len(table.blocks) == 2 and table.length == 7 and pool.free_blocks == 2
    assert PAD_SLOT // pool.block_size not in table.blocks
    slots = table.slots(0, 7)
    np.testing.assert_array_equal(
        pool.flat_keys(1)[0, slots, 0], [100, 101, 102, 103, 104, 105, 200]
    )
    assert table.blocks_needed(1) == 0 and table.blocks_needed(2) == 1
    table.free()
    assert pool.free_blocks == 4 and table.blocks == [] and table.length == 0
    assert not pool.flat_keys(0)[:, PAD_SLOT].any()


def test_an_empty_pool_refuses_and_a_block_is_released_once() -> None:
    pool = BlockPool(CONFIG, num_blocks=2, block_size=4)
    block = pool.allocate()
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.release(block)
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(block)


def test_full_prompt_blocks_are_shared_and_evicted_only_when_unused() -> None:
    pool = BlockPool(CONFIG, num_blocks=5, block_size=4)
    prompt = list(range(10))  # two full blocks and a partial one
    first = BlockTable(pool)
    first.store(outputs(10, 0.0), row=0, n=10)
    pool.remember(prompt, first.blocks)
    assert pool.cached_blocks == 2

    second = BlockTable(pool)
    assert pool.cached_tokens([*prompt[:8], 99]) == 8 and pool.cached_tokens(prompt[:8]) == 4
    assert second.share_prefix([*prompt[:8], 99]) == 8  # both full blocks, 1 token to compute
    assert second.blocks == first.blocks[:2] and pool.prefix_hits == 2
    assert BlockTable(pool).share_prefix([0, 1, 2, 3]) == 0  # always leaves one token
    assert BlockTable(pool).share_prefix([7, 1, 2, 3, 4]) == 0  # different first block

    first.free()
    second.free()
    assert pool.free_blocks == 2 and pool.available_blocks == 4  # two held by the cache only
    taken = [pool.allocate() for _ in range(4)]  # takes the free ones, then evicts
    assert pool.cached_blocks == 0 and sorted(taken) == [1, 2, 3, 4]
