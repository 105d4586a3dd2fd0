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
    np.testing.assert_array_equal(pool.keys[1][slots][:, 0, 0], [100, 101, 102, 103, 104, 105, 200])
    assert table.blocks_needed(1) == 0 and table.blocks_needed(2) == 1
    table.free()
    assert pool.free_blocks == 4 and table.blocks == [] and table.length == 0
    assert not pool.keys[0][PAD_SLOT].any()


def test_an_empty_pool_refuses_and_a_block_is_released_once() -> None:
    pool = BlockPool(CONFIG, num_blocks=2, block_size=4)
    block = pool.allocate()
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.release(block)
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(block)
