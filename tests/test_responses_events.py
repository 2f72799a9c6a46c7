"""The end of an upstream's own Responses stream stopped at its length: its open items closed with
the text their deltas carried, then `response.incomplete` with the output so far (the relay's,
`dispatch.relay`; through the SDK in tests/test_careless_overrun.py)."""

from __future__ import annotations

from typing import Any

import orjson

from edgeroute import sse
from edgeroute.endpoints.responses_stream import ChatToResponses, NativeStream


def _ev(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _events(data: bytes) -> list[dict[str, Any]]:
    got = []
    for ev in sse.split_events(data)[0]:
        payload = sse.event_data(ev)
        if payload is not None and payload != b"[DONE]":
            got.append(orjson.loads(payload))
    return got


def test_open_items_are_closed_with_what_their_deltas_said() -> None:
    call = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "weather", "arguments": ""}
    message = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
    upstream = [
        {"type": "response.created", "response": {"id": "resp_1", "object": "response", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": call},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0, "delta": '{"ci'},
        {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0, "delta": 'ty": '},
        {"type": "response.output_item.added", "output_index": 1, "item": message},
        {"type": "response.content_part.added", "item_id": "msg_1", "output_index": 1, "content_index": 0,
         "part": {"type": "refusal", "refusal": ""}},
        {"type": "response.refusal.delta", "item_id": "msg_1", "output_index": 1, "content_index": 0, "delta": "No"},
        {"type": "response.refusal.delta", "item_id": "msg_1", "output_index": 1, "content_index": 0, "delta": "pe"},
    ]  # fmt: skip
    stream = NativeStream(bounded=True)
    raw = b"".join(_ev({**e, "sequence_number": i}) for i, e in enumerate(upstream))
    assert stream.feed(raw) == raw  # relayed unchanged
    end = stream.length_end(10, 200, raw)
    assert end is not None
    got = _events(end)
    assert [e["sequence_number"] for e in got] == list(range(len(upstream), len(upstream) + len(got)))
    assert [e["type"] for e in got] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert got[0]["arguments"] == '{"city": ' and got[2]["refusal"] == "Nope"
    final = got[-1]["response"]
    assert final["id"] == "resp_1" and final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [(o["id"], o["status"]) for o in final["output"]] == [("fc_1", "incomplete"), ("msg_1", "incomplete")]
    assert final["output"][1]["content"] == [{"type": "refusal", "refusal": "Nope"}]
    assert final["usage"]["input_tokens"] == 10 and final["usage"]["output_tokens"] == 200
    # A stream whose request set no bound keeps nothing: the relay ends it with an error event.
    unbounded = NativeStream()
    unbounded.feed(raw)
    assert unbounded.length_end(10, 200, raw) is None


def _message_stream(deltas: list[str]) -> list[bytes]:
    """A native stream's reads: its head, then a text delta a read."""
    message = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    head = [
        {"type": "response.created", "response": {"id": "resp_1", "object": "response", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": message},
        {"type": "response.content_part.added", **at, "part": {"type": "output_text", "text": ""}},
    ]
    events = [head] + [[{"type": "response.output_text.delta", **at, "delta": d}] for d in deltas]
    seq = iter(range(100))
    return [b"".join(_ev({**e, "sequence_number": next(seq)}) for e in read) for read in events]


def test_a_read_the_relay_withheld_is_no_part_of_the_output() -> None:
    # The relay withholds the read that takes a stream past its limit (never sent, never given
    # back in the end's output); what it relayed ends with the reads before it.
    reads = _message_stream(["Hello", " world", " and a flood"])
    for relayed, text in ((3, "Hello world"), (4, "Hello world and a flood")):
        stream = NativeStream(bounded=True)
        for read in reads:
            stream.feed(read)
        end = stream.length_end(10, 200, b"".join(reads[:relayed]))
        assert end is not None
        final = _events(end)[-1]
        assert final["type"] == "response.incomplete"
        assert final["response"]["output"][0]["content"][0]["text"] == text
        assert final["sequence_number"] == _events(end)[0]["sequence_number"] + len(_events(end)) - 1


def _chat(delta: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": delta}]}) + b"\n\n"


def test_a_chat_stream_read_the_relay_withheld_is_no_part_of_the_output() -> None:
    # Through the chat translation: the withheld read ended the answer too, yet the end is at its
    # length with what was relayed; and one whose last read was relayed gives all of it.
    req = {"model": "m", "input": "hi", "max_output_tokens": 5}
    reads = [_chat({"content": "Hello"}), _chat({"content": " world"}), _chat({"content": "!"}) + sse.DONE + b"\n\n"]
    for fed, relayed in ((3, 2), (2, 2)):
        stream = ChatToResponses(req, None, lambda _: {}, bounded=True)
        outs = [stream.feed(read) for read in reads[:fed]]
        end = stream.length_end(10, 200, b"".join(outs[:relayed]))
        assert end is not None
        got = _events(end)
        final = got[-1]["response"]
        assert got[-1]["type"] == "response.incomplete"
        assert final["incomplete_details"] == {"reason": "max_output_tokens"}
        assert (
            final["output"][0]["content"][0]["text"] == "Hello world" and final["output"][0]["status"] == "incomplete"
        )
        assert final["usage"]["output_tokens"] == 200
        assert [e["sequence_number"] for e in got] == list(
            range(got[0]["sequence_number"], got[-1]["sequence_number"] + 1)
        )
