"""A large request body parsed (in a worker thread) with the cyclic collector paused.

orjson holds the GIL for a whole parse, so the event loop waits for it even off the loop.
A body of millions of small containers (9 MB of `{}` or `[[1]]`) triggers collections of
the young objects over and over while it is built: measured 0.77 s for 600,000 nested
objects, 0.34 s with the collector paused. Paused for the parse only (nothing parsed is
garbage yet); the parses in flight are counted so that the last one resumes it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

LARGE_BYTES = 1 << 20  # smaller bodies parse in milliseconds: the collector is left alone

_lock = threading.Lock()
_pausing = 0  # threads in flight with the collector paused
_resume = False  # whether the collector ran before the first of them paused it


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector paused while a thread builds many containers that are no garbage
    yet (a parse, redaction's patterns): a collection it triggers walks them all with the GIL
    held, a stall of the event loop however far off it the work runs. Counted, so that the
    last one in flight resumes it (and only if it ran before)."""
    global _pausing, _resume
    with _lock:
        if _pausing == 0:
            _resume = gc.isenabled()
        _pausing += 1
        gc.disable()
    try:
        yield
    finally:
        with _lock:
            _pausing -= 1
            if _pausing == 0 and _resume:
                gc.enable()


def loads(raw: bytes) -> Any:
    """`orjson.loads(raw)` (raising as it does), the collector paused if `raw` is large."""
    if len(raw) <= LARGE_BYTES:
        return orjson.loads(raw)
    with collector_paused():
        return orjson.loads(raw)
