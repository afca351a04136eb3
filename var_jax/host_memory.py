"""Hand the C heap's freed pages back to the OS after an XLA compile.

Compiling allocates and frees hundreds of MiB on the host heap (0.6 GiB for the unrolled d16 sampler on CPU).
glibc keeps the freed chunks mapped, so they stay resident while the compiled program then allocates its own
buffers beside them; malloc_trim returns them. A no-op where there is no glibc malloc_trim (macOS, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; True where that is possible here."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
