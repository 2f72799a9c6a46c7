"""`stream_options.include_usage` set in a streamed chat request's body, without parsing it whole.

A stream the client asked without usage is still asked upstream with it (`Attempts.upstream_request`).
A body that already has `stream_options` was parsed and written again for that, each attempt:
orjson holds the GIL for the whole of each call, so even in a worker thread a body of many
small messages (14 MB: 0.15 s) held the event loop. The client's `stream_options` object is
found with byte scans instead (the core's, with the GIL released, for where the top level is),
and only that small object is parsed and replaced.
"""

from __future__ import annotations

import re

import orjson

from edgeroute import _core
from edgeroute.errors import checked_json

_KEY = re.compile(rb'"stream_options"\s*:\s*')
# Brackets put after a prefix of the body to read its depth off the core's scan. Deeper than
# any body the core decides on (serde_json refuses one nested past 128).
_PROBE = 1024
# The client's `stream_options` object is looked for this far at most (it holds a flag or two).
_MAX_OPTIONS_BYTES = 4096
# More keys of that name than this (in tools' schemas, say) and the body is parsed whole: each
# costs a scan of the body before it.
_MAX_CANDIDATES = 4


def with_stream_usage(body: bytes) -> bytes:
    """`body` (a chat request's JSON object) with `stream_options.include_usage` true."""
    if body[:2] == b'{"' and body.find(b'"stream_options"') < 0:  # the core's compact body: no parse
        return b'{"stream_options":{"include_usage":true},' + body[1:]
    spliced = _splice(body)
    if spliced is not None:
        return spliced
    # Anything unusual (an odd value, a duplicate key): the slow way. A body the core took that
    # orjson cannot read (a field it skips holding `1e400`) is a 400, not a 500.
    obj = checked_json(body)
    opts = obj.get("stream_options")
    obj["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
    return orjson.dumps(obj)


def _splice(body: bytes) -> bytes | None:
    """`body` with its top-level `stream_options` object replaced by the same with usage on, or
    None when it has no single such object (then the caller parses it whole)."""
    keys: list[re.Match[bytes]] = []
    for m in _KEY.finditer(body):
        if len(keys) == _MAX_CANDIDATES:
            return None
        keys.append(m)
    found = [m for m in keys if _at_top_level(body, m.start())]
    if len(found) != 1 or body[found[0].end() : found[0].end() + 1] != b"{":
        return None
    start = found[0].end()
    # The object ends at the first `}` whose prefix parses: a JSON value ends where it closes.
    end = body.find(b"}", start)
    while 0 <= end < start + _MAX_OPTIONS_BYTES:
        try:
            opts = orjson.loads(body[start : end + 1])
        except orjson.JSONDecodeError:
            end = body.find(b"}", end + 1)
            continue
        merged = orjson.dumps({**opts, "include_usage": True})
        return b"".join((body[:start], merged, body[end + 1 :]))
    return None


def _at_top_level(body: bytes, at: int) -> bool:
    """Whether the quote at `at` opens a key of the top-level object: it is not escaped (else it
    is inside another string), and the body before it ends at depth 1. `_PROBE` more brackets
    there nest past `_PROBE + 1` only if it ends deeper, since the body itself never nests that
    deep (the scan skips strings)."""
    before = body[:at]
    if (at - len(before.rstrip(b"\\"))) % 2:
        return False
    return not _core.Router.nesting_over(before + b"[" * _PROBE, _PROBE + 1)
