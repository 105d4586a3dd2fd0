"""Garbage-collector settings for a long-running daemon with many long-lived objects.

CPython's automatic full (generation 2) collections scan every tracked object: with thousands
of agents, connections and buffers that is 100k+ objects and a 35-180 ms pause of the event
loop each time (measured in bench/tcp.py), which is what broke the p99 latency of device
acknowledgements, while freeing almost nothing (turns create very little cyclic garbage;
reference counting frees the rest). So, once start-up is done:

- everything allocated so far (modules, config, warmed models) is frozen out of the GC's view;
- young collections stay automatic (cheap: they scan only new objects), but less frequent;
- automatic middle (generation 1) collections are off too: each scanned every object that
  survived the last 20 young ones, which after a wave of (re)connections (1,000 devices: their
  sessions, links, agent handles) took 45-90 ms of the loop's CPU (bench/tcp.py --probe), a
  pause in the middle of the frames' ACK latency; objects that survive a young collection
  now wait for the full one (cyclic garbage among them: ~20k objects per 1,000 closed
  connections, freed at the next full collection);
- automatic full collections are off, and `collect_full()` runs one at a fixed interval
  instead, so a full pause happens every few minutes rather than every few seconds.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000  # allocations minus deallocations before a generation-0 collection
NEVER = 2**30  # collections of the younger generation before an automatic one: never
MIDDLE_THRESHOLD = NEVER  # generation-0 collections before a generation-1 collection
FULL_COLLECTION_INTERVAL_S = 300.0


def tune_for_serving() -> None:
    """Call once, after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, NEVER)


def collect_full() -> int:
    """One full collection (what the automatic ones would have done); returns objects freed."""
    started = time.perf_counter()
    freed = gc.collect()
    log.debug(
        "gc: full collection",
        extra={"fields": {"freed": freed, "ms": f"{(time.perf_counter() - started) * 1000:.1f}"}},
    )
    return freed
