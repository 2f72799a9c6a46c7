"""The end of an upstream's own Responses stream stopped at its length: its open items closed with
the text their deltas carried, then `response.incomplete` with the output so far (the relay's,
`dispatch.relay`; through the SDK in tests/test_careless_overrun.py)."""

from __future__ import annotations

from typing import Any

import orjson

from edgeroute import sse
from edgeroute.endpoints.responses_stream import NativeStream


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
    end = stream.length_end(10, 200)
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
    assert unbounded.length_end(10, 200) is None
