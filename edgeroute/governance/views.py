"""Masked views of config texts for the admin API: `/admin/config`, a version, a diff of two.

A view parses the stored YAML and masks its secrets (`versions.masked_data`): pure Python, about
12 ms per KB of config, once on the event loop for every call. Any viewer key (a dashboard's) may
ask, so a loop of such calls stalled every client (a 3 KB config: a client's p50 from 1 to 186 ms;
a 230 KB one, 3 s per call). Here a view is built on a thread of its own, one at a time per
process, and kept (the last few texts, by their content: a version never changes), so asking
again costs a dictionary lookup; past `MAX_WAITING` callers waiting for the thread, 429. A text
with an `exec:` reference is not kept: its command is masked by `redact.text`, which also masks
secrets registered since (a view kept would not), so each view of it is built again, on the thread.
"""

from __future__ import annotations

import asyncio
import difflib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import orjson

from edgeroute.errors import too_many
from edgeroute.governance.versions import masked_data, masked_yaml

_T = TypeVar("_T")

KEPT = 16  # views of each kind kept: the running config and the versions being compared
MAX_WAITING = 8

_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeroute-config-views")


class _Kept:
    """The last `KEPT` results of one kind, least recently used out first."""

    def __init__(self) -> None:
        self.items: OrderedDict[object, object] = OrderedDict()
        self.lock = threading.Lock()  # read on the loop, written on the thread

    def get(self, key: object) -> object | None:
        with self.lock:
            found = self.items.get(key)
            if found is not None:
                self.items.move_to_end(key)
            return found

    def put(self, key: object, value: object) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > KEPT:
                self.items.popitem(last=False)


_json = _Kept()
_diffs = _Kept()
_waiting = 0


async def _built(kept: _Kept, key: object, build: Callable[[], _T], keep: bool) -> _T:
    global _waiting
    if keep and (found := kept.get(key)) is not None:
        return found  # type: ignore[return-value]
    if _waiting >= MAX_WAITING:
        raise too_many("Too many config views are being prepared; try again.", "config_view_busy", 1)
    _waiting += 1
    try:
        # Looked up again on the thread: callers queued behind the one that built it find it there.
        value = await asyncio.get_running_loop().run_in_executor(_THREAD, _once, kept, key, build, keep)
    finally:
        _waiting -= 1
    return value


def _once(kept: _Kept, key: object, build: Callable[[], _T], keep: bool) -> _T:
    if not keep:
        return build()
    if (found := kept.get(key)) is not None:
        return found  # type: ignore[return-value]
    value = build()
    kept.put(key, value)
    return value


def _kept(*texts: str) -> bool:
    return not any("exec:" in t for t in texts)


async def masked_json(text: str) -> orjson.Fragment:
    """The config `text` as JSON, its secrets masked, to place in an answer as it is."""
    return await _built(_json, text, lambda: orjson.Fragment(orjson.dumps(masked_data(text))), _kept(text))


async def diff(a: int, a_text: str, b: int, b_text: str) -> str:
    """A unified diff of two versions' masked texts."""

    def build() -> str:
        lines = difflib.unified_diff(
            masked_yaml(a_text).splitlines(keepends=True),
            masked_yaml(b_text).splitlines(keepends=True),
            fromfile=f"version {a}",
            tofile=f"version {b}",
        )
        return "".join(lines)

    return await _built(_diffs, (a, a_text, b, b_text), build, _kept(a_text, b_text))
