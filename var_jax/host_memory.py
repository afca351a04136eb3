"""Host memory of XLA:CPU runs: the compiler's freed heap handed back, huge pages for per-call temporaries."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

# glibc's malloc backs its large allocations with transparent huge pages under this tunable (the kernel's THP
# mode must be `always` or `madvise`). XLA:CPU allocates a program's temporaries afresh at every call and the
# kernel faults them in: for the d8 train step at batch 4, 2.2 GiB, ~575,000 faults of 4 KiB and ~0.9 s of system
# time per step; ~1,500 faults with huge pages (the step 2.6 -> 2.2 s on the project's 2-core machine).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS; True where that is possible here (glibc).

    Compiling allocates and frees hundreds of MiB (0.6 GiB for the unrolled d16 sampler). glibc keeps the freed
    chunks mapped, so without this they stay resident while the compiled program allocates its buffers beside them.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def is_var_jax_command(argv: list[str]) -> bool:
    """Whether an interpreter command line (sys.orig_argv) runs the var-jax CLI: `python [flags] -m var_jax ...` or
    the `var-jax` console script."""
    if len(argv) > 1 and os.path.basename(argv[1]) == "var-jax":
        return True
    return any(a == "-m" and b == "var_jax" for a, b in zip(argv[1:], argv[2:]))


def restart_with_huge_pages() -> None:
    """Re-execute this process (same interpreter, flags and arguments) with HUGE_PAGES_TUNABLE added to
    GLIBC_TUNABLES, which glibc reads only at start-up. Returns without restarting off Linux/glibc, or where
    GLIBC_TUNABLES already sets `hugetlb` (the restarted process; or the user's choice: `glibc.malloc.hugetlb=0`
    opts out)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or "hugetlb" in tunables or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
