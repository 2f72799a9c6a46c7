"""A relayed stream's last bytes (where its usage event and `[DONE]` are) as the relay reads them
from its transcript, whatever the transcript compacted: the usage a stream reported is what it
is priced by, also when the read that carried it pushed the transcript past its bound."""

from __future__ import annotations

import orjson

from edgeroute.dispatch.transcript import COMPACT_BYTES, TAIL_BYTES, Transcript
from edgeroute.sse import find_usage


def _event(i: int) -> bytes:
    delta = {"content": f"word{i} " * (1 + i % 7)}
    return b"data: " + orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}\n\n'
DONE = b"data: [DONE]\n\n"


def test_the_tail_is_the_last_bytes_relayed_across_compactions() -> None:
    for step in (1, 3, 40, 700):  # events a read
        said = Transcript(b"", keep_whole=False)
        relayed: list[bytes] = []
        events = [_event(i) for i in range(6000)] + [USAGE, DONE]
        for at in range(0, len(events), step):
            read = b"".join(events[at : at + step])
            said.add(read)
            relayed.append(read)
            if at % (step * 97) == 0 or at + step >= len(events):
                whole = b"".join(relayed)
                for n in (len(b"data: [DONE]") + 1, TAIL_BYTES):
                    assert said.tail(n) == whole[-n:]
        assert said.size > 2 * COMPACT_BYTES and not said.whole  # compacted, more than once


def test_a_usage_event_in_the_read_that_compacts_is_still_found() -> None:
    said = Transcript(b"data: {}\n\n", keep_whole=False)
    filler = _event(1)
    while said.size + len(filler) <= COMPACT_BYTES - 50:
        said.add(filler)
    said.add(USAGE + DONE)  # this read passes the bound: compacted with everything before it
    assert not said.whole
    assert find_usage(said.tail()) == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
