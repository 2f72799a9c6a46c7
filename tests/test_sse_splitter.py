"""`sse.EventSplitter`: the events of a stream read in any pieces are those of the whole
stream read at once, and an event never ended is refused at its bound."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute import sse

_PARTS = st.lists(st.sampled_from([b"data: {}", b"\n", b"\r\n", b"\r", b"event: x", b" ", b'"error"', b"a"]))


@settings(max_examples=2000)  # CR/LF runs across cuts are rare draws: 100 missed "\r\r\n" one run in ten
@given(_PARTS, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_pieces_split_as_the_whole_stream(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    splitter = sse.EventSplitter()
    got: list[bytes] = []
    at = 0
    for cut in [*sorted(min(c, len(stream)) for c in cuts), len(stream)]:
        got += splitter.feed(stream[at:cut])
        at = cut
    assert got == sse.split_events(stream)[0]


def test_a_cr_before_a_crlf_is_normalised_once_as_in_one_piece() -> None:
    # A line ended by CR, then a blank line ended by CRLF (SSE's three line ends): one event.
    stream = b"data: {}\r\r\n\n"
    assert sse.EventSplitter().feed(stream) == sse.split_events(stream)[0] == [b"data: {}"]


def test_lines_ended_by_cr_alone_are_events() -> None:
    stream = b"data: {}\r\rdata: [DONE]\r\r"
    assert sse.EventSplitter().feed(stream) == sse.split_events(stream)[0] == [b"data: {}", b"data: [DONE]"]


def test_an_event_never_ended_is_refused_at_its_bound() -> None:
    splitter = sse.EventSplitter(limit=1 << 20)
    assert splitter.feed(b"data: {}\n\ndata: {") == [b"data: {}"]
    with pytest.raises(sse.EventTooLarge, match="event still unfinished past 1 MiB"):
        for _ in range(20):
            splitter.feed(b"x" * 65536)


def test_an_error_event_has_its_own_bound() -> None:
    splitter = sse.EventSplitter(error_limit=1 << 20)
    splitter.feed(b'event: error\ndata: {"err')
    with pytest.raises(sse.EventTooLarge, match="error event still unfinished past 1 MiB"):
        splitter.feed(b'or": "' + b"x" * (1 << 20))
    other = sse.EventSplitter(error_limit=1 << 20)  # not an error: up to the event bound
    assert other.feed(b"data: " + b"x" * (2 << 20)) == []


# -- a burst of events (several reads relayed together) -----------------------------------------

_BURSTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    b'data:{"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n',
    b'data: {"choices":[]}\n\ndata:   {"choices":[{"delta":{}}]}\n\ndata: [DONE]\n\n',
    # tool calls without an index: numbered, the events around them as they came
    b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    b'data: {"choices":[{"delta":{"tool_calls":[{"id":"t1","function":{"name":"f","arguments":"{}"}}]}}]}\n\n'
    b'data: {"choices":[{"delta":{"tool_calls":[{"id":"t2","function":{"name":"g","arguments":"{}"}}]}}]}\n\n',
    # shapes the burst's own path leaves to the general one
    b'data: {"choices":[]}\n\n\n\ndata: {"choices":[]}\n\n',
    b': keep-alive\n\ndata: {"choices":[]}\n\n',
    b'event: x\ndata: {"choices":[]}\n\ndata: {"choices":[]}\n\n',
    b'data: {"choices":[]}\r\n\r\ndata: {"choices":[]}\r\n\r\n',
    b"data: {\ndata: }\n\ndata: {}\n\n",
]
_BAD_BURSTS = [
    b'data: {"choices":[]}\n\ndata: not json\n\ndata: {"choices":[]}\n\n',
    b'data: {"choices":[]}\n\ndata: [1]\n\n',
    b'data: {"choices":[{"delta":null}]}\n\ndata: {"choices":[]}\n\n',
]


def _one_by_one(burst: bytes) -> tuple[bytes, list[object]]:
    """What `ChatChunks` makes of `burst`'s events read one at a time (the relay's reads before)."""
    c = sse.ChatChunks()
    c.parsed = []
    events, rest = sse.split_events(burst)
    assert rest == b""
    out = b"".join(c.feed(ev + b"\n\n") for ev in events)
    return out, c.parsed


@pytest.mark.parametrize("burst", _BURSTS)
def test_a_burst_of_events_is_checked_and_sent_as_its_events_one_by_one(burst: bytes) -> None:
    """Pins a speed-up (the burst's events checked where they lie): the same bytes out and the
    same objects handed to the hold as when the events came one a read."""
    c = sse.ChatChunks()
    c.parsed = []
    out = c.feed(burst)
    assert (out, c.parsed) == _one_by_one(burst)


@pytest.mark.parametrize("burst", _BAD_BURSTS)
def test_a_burst_with_an_unreadable_event_fails_as_its_events_one_by_one(burst: bytes) -> None:
    c = sse.ChatChunks()
    c.parsed = []
    with pytest.raises(sse.StreamProtocolError) as burst_error:
        c.feed(burst)
    one = sse.ChatChunks()
    one.parsed = []
    with pytest.raises(sse.StreamProtocolError) as one_error:
        _one_by_one_into(one, burst)
    assert str(burst_error.value) == str(one_error.value)
    assert c.parsed == one.parsed  # the events before it were checked, and handed on, alike


def _one_by_one_into(c: sse.ChatChunks, burst: bytes) -> None:
    for ev in sse.split_events(burst)[0]:
        c.feed(ev + b"\n\n")


def test_a_burst_of_plain_events_goes_on_as_it_came() -> None:
    """A burst of one-line events is not split, joined and copied again (it was, event by event)."""
    burst = _BURSTS[0] + _BURSTS[1]
    assert sse.ChatChunks().feed(burst) is burst


def _find_usage_by_regex(tail: bytes) -> dict[str, object] | None:
    """`sse.find_usage` as it was: the last match of the pattern over the whole tail."""
    idx = -1
    for m in re.finditer(rb'"usage"\s*:\s*\{', tail):
        idx = m.start()
    if idx < 0:
        return None
    start, end = tail.rfind(b"data:", 0, idx), tail.find(b"\n", idx)
    if start < 0:
        return None
    try:
        obj = orjson.loads(tail[start + 5 : end if end >= 0 else len(tail)])
    except orjson.JSONDecodeError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


_USAGE_PARTS = st.lists(
    st.sampled_from(
        [b"data: ", b'{"usage":{"prompt_tokens":1}}', b'{"usage": {"total_tokens":2}}', b'"usage"', b'"usage":null',
         b'"usage"usage"', b":", b" ", b"{", b"}", b"\n\n", b'{"choices":[],', b'"usage" : {"a":3}}', b"x"]
    ),
    max_size=12,
)  # fmt: skip


@settings(max_examples=1500)
@given(_USAGE_PARTS)
def test_the_usage_found_from_the_end_is_the_last_the_pattern_matches(parts: list[bytes]) -> None:
    """Pins a speed-up: the tail is searched from its end, with the same answer as a regex over all of it."""
    tail = b"".join(parts)
    assert sse.find_usage(tail) == _find_usage_by_regex(tail)


def test_a_null_error_is_no_error_event_and_is_relayed_untouched() -> None:
    """Every Responses `response.completed` says `"error": null`: not an error event, so the
    relay sends it as the upstream wrote it, without decoding or redacting the whole answer it
    carries (a 900 KB one cost the loop 0.8 s). An error next to it, or spelled with spaces,
    still counts."""
    answer = "Bearer " + "x" * 40  # a credential's shape, in the model's own words
    completed = orjson.dumps({"type": "response.completed", "response": {"error": None, "output": [{"text": answer}]}})
    assert not sse.has_error_key(completed)
    assert not sse.has_error_key(b'{"response": {"error" :  null}}')
    event = b"event: response.completed\ndata: " + completed + b"\n\n"
    assert sse.redact_errors(event) is event
    assert sse.has_error_key(b'{"error": null, "detail": {"error": {"message": "m"}}}')
    assert sse.has_error_key(b'{"type": "error", "error": {"message": "m"}}')
    assert sse.has_error_key(b'{"error": {"message": "Bearer abc"}}')
