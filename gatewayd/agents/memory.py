"""Give memory freed by closed agent databases back to the OS (glibc only).

Each SQLite connection allocates ~100-200 KiB (lookaside, page cache, statement cache). When
thousands of agents hibernate, that memory is freed but glibc keeps it in its arenas, so the
process RSS stays at its high-water mark. `malloc_trim(0)` returns it. On other C libraries
this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)


def _load_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_trim()


def release_free_memory() -> bool:
    """Return free heap memory to the OS; True if the C library supports it."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
