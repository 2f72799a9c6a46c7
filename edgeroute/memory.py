"""Memory freed after a burst goes back to the kernel.

glibc serves an allocation of 128 KiB or more with a mapping of its own, returned to the
kernel on free; but each time such a block is freed it raises that threshold to the block's
size (up to 32 MiB), and from then on request bodies of megabytes come from the heap, which
it does not give back. After twenty 8 MB bodies the proxy stayed 150 to 200 MB above its idle
size for good: memory that only grows, as users of other gateways complain. Fixing the
threshold at 128 KiB keeps every large block a mapping of its own: a body's pages are faulted
in anew (about a millisecond for 8 MB), a small cost beside parsing it.

Smaller blocks still come from the heap: a body read from a slow client arrives in pieces of
64 KiB or less, each a block of its own until the body is joined. Sixty clients sending 8 MB
bodies at once left 130 to 340 MB of such pieces freed inside the heap, where glibc keeps them (it
returns only a free stretch at the heap's very top). `keep_trimmed` hands them back
(`malloc_trim`) when the heap holds `TRIM_FREE_BYTES` free and that changed since it last did.
A trim that gives back 160 MB takes about 30 ms, during which an allocation of the event loop's
past Python's small-object allocator waits for glibc's lock; one with nothing to give back,
a third of a millisecond; reading the free bytes, 40 µs.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import sys
from typing import Any

log = logging.getLogger("edgeroute.memory")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BYTES = 128 * 1024
TRIM_EVERY_S = 5.0
TRIM_FREE_BYTES = 32 << 20
TRIM_AT_MOST_EVERY_S = 80.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library the interpreter runs on, where that is Linux's (glibc's calls below)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _libc_function(name: str) -> Any | None:
    """`name` from `_libc`, or None where it has no such function (not glibc, or an older one)."""
    return getattr(_libc(), name, None)


def return_large_blocks() -> bool:
    """Fixes glibc's mapping threshold at `LARGE_BYTES`; False where there is no glibc mallopt."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE_BYTES))


def rss_bytes() -> int | None:
    """The process's resident memory, or None where /proc does not say."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def free_heap_bytes() -> int | None:
    """The bytes free inside glibc's heaps, resident or not (`mallinfo2`, glibc 2.33 or later);
    None where it cannot say. It walks the free lists: call it from a worker thread."""
    mallinfo2 = _libc_function("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def trim() -> int:
    """Returns the heap's free pages to the kernel (glibc's `malloc_trim`; ctypes releases the
    GIL while it runs, so call it from a worker thread), and how many bytes that gave back."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is None:
        return 0
    malloc_trim.argtypes = [ctypes.c_size_t]
    before = rss_bytes() or 0
    malloc_trim(0)
    return max(0, before - (rss_bytes() or before))


async def keep_trimmed(every_s: float = TRIM_EVERY_S, free_bytes: int = TRIM_FREE_BYTES) -> None:
    """Until cancelled: looks every `every_s`; when the heap holds `free_bytes` or more free,
    trims it (in a worker thread). A trim leaves the free blocks in the heap, only without their
    pages, so the free bytes do not say whether another is worth it: one that gave back little
    doubles the wait for the next (up to `TRIM_AT_MOST_EVERY_S`), unless a quarter of
    `free_bytes` more was freed meanwhile; one that gave back more than that keeps looking often."""
    if _libc_function("malloc_trim") is None or await asyncio.to_thread(free_heap_bytes) is None:
        return
    loop = asyncio.get_running_loop()
    wait, due, trimmed_at = every_s, 0.0, -1  # trimmed_at: the free bytes at the last trim
    while True:
        await asyncio.sleep(every_s)
        free = await asyncio.to_thread(free_heap_bytes) or 0
        if free < free_bytes:
            wait = every_s
            continue
        if loop.time() < due and abs(free - trimmed_at) < free_bytes // 4:
            continue
        returned = await asyncio.to_thread(trim)
        log.debug("trimmed the heap (%.0f MB free in it): %.0f MB returned", free / 2**20, returned / 2**20)
        wait = every_s if returned >= free_bytes // 4 else min(2 * wait, TRIM_AT_MOST_EVERY_S)
        due, trimmed_at = loop.time() + wait, free
