"""Large blocks of memory go back to the kernel when they are freed.

glibc serves an allocation of 128 KiB or more with a mapping of its own, returned to the
kernel on free; but each time such a block is freed it raises that threshold to the block's
size (up to 32 MiB), and from then on request bodies of megabytes come from the heap, which
it does not give back. After twenty 8 MB bodies the proxy stayed 150 to 200 MB above its idle
size for good: memory that only grows, as users of other gateways complain. Fixing the
threshold at 128 KiB keeps every large block a mapping of its own: a body's pages are faulted
in anew (about a millisecond for 8 MB), a small cost beside parsing it.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BYTES = 128 * 1024


def return_large_blocks() -> bool:
    """Fixes glibc's mapping threshold at `LARGE_BYTES`; False where there is no glibc mallopt."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BYTES))
