"""GC settings for serving: start-up objects frozen, no automatic middle or full collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gatewayd import gctuning


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_freezes_start_up_objects_and_stops_automatic_middle_and_full_collections(
    restore_gc: None,
) -> None:
    gctuning.tune_for_serving()
    assert gc.get_freeze_count() > 1000
    assert gc.get_threshold() == (gctuning.YOUNG_THRESHOLD, gctuning.NEVER, gctuning.NEVER)


def test_scheduled_full_collection_still_frees_cycles(restore_gc: None) -> None:
    gctuning.tune_for_serving()

    class Node:
        pass

    for _ in range(100):
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
    del a, b
    assert gctuning.collect_full() >= 200
