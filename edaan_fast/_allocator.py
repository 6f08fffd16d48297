"""Keeping glibc from handing large freed blocks back to the OS (CPU processes only).

glibc's malloc returns a freed block of more than a few MB to the kernel (``munmap``, or
trimming the heap top) and maps fresh pages on the next allocation, so a loop that allocates
large tensors pays one page fault per 4 KiB page on every iteration. On small virtual machines
that costs more than the arithmetic of memory-bound ops (about 5 ms to fault in a 25 MB
image batch on a 2-core VM), and which allocations pay it depends on the order of frees.
Caching allocators (jemalloc, tcmalloc: ``LD_PRELOAD``) avoid it; so does raising glibc's
thresholds, which this module does with ``mallopt``.

It changes process-wide allocator behaviour (freed memory stays mapped, so the resident size
does not shrink back), which is the business of an application, not of a library import:
``python -m edaan_fast.train`` / ``evaluate`` and the benchmarks call :func:`pin_malloc_thresholds`
at start-up; ``import edaan_fast`` never does. ``EDAAN_FAST_GLIBC_DEFAULTS=1`` opts out. The
environment variables ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` do the same for
any program.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["pin_malloc_thresholds"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_state: str | None = None


def pin_malloc_thresholds(threshold: int = 1 << 30) -> str:
    """Raise glibc's trim and mmap thresholds to ``threshold`` bytes; returns what was done.

    Idempotent. A no-op (with a message saying why) off glibc or when
    ``EDAAN_FAST_GLIBC_DEFAULTS=1``.
    """
    global _state
    if _state is not None:
        return _state
    if os.environ.get("EDAAN_FAST_GLIBC_DEFAULTS", "0") == "1":
        _state = "glibc defaults (EDAAN_FAST_GLIBC_DEFAULTS=1)"
        return _state
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        _state = "allocator defaults (no glibc mallopt)"
        return _state
    ok = mallopt(_M_TRIM_THRESHOLD, threshold) == 1 and mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    _state = (f"glibc trim/mmap thresholds pinned at {threshold >> 20} MiB" if ok
              else "allocator defaults (mallopt refused)")
    return _state
