"""The real SmolLM2 for `model` tests, fetched and converted at most once at a time.

`scripts/test` runs the suite in several pytest-xdist workers: on a machine whose model cache
is empty, two of them may ask for the model at the same moment. Converting it twice at once
would let one replace the directory the other is already loading, so the workers take turns
on a lock file in the cache: the first converts, the others then find it built.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from pathlib import Path

from engine.generate.build import default_cache_dir, ensure_model


def smollm2_dir(progress: Callable[[str], None] = print) -> Path:
    """The converted SmolLM2 directory in the model cache ($GATEWAYD_MODEL_CACHE or
    ~/.cache/gatewayd/models): the first run downloads (~93 MB) and converts (~40 s)."""
    cache = default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".smollm2.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return ensure_model("smollm2", progress=progress)
