"""A large `/v1/messages` body does not stall the event loop for everyone else.

What decides between the chat translation and the pass-through (`lost_fields`, a walk of every
block) runs with the parse in a worker thread for a body of megabytes: 3 million empty blocks
(9 MB, refused in the end) held the loop 3-4 s before, while the same body on
`/v1/chat/completions` holds it tens of milliseconds. orjson's parse holds the GIL
(a few tenths of a second for such a body, with the collector paused): the bound is loose
enough for a loaded CI host and far under the stall it was.
"""

from __future__ import annotations

from aiohttp import ClientSession

from tests.conftest import Proxy
from tests.test_looplag import CFG, _sample

_LAG = "edgeroute_event_loop_lag_max_seconds"


async def test_a_body_of_millions_of_blocks_does_not_stall_the_loop(start_proxy) -> None:
    proxy: Proxy = await start_proxy(CFG)
    blocks = b",".join([b"{}"] * 3_000_000)
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[' + blocks + b"]}]}"
    async with ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:  # the maximum is since the previous scrape
            assert r.status == 200
        async with s.post(proxy.url + "/v1/messages", data=body, headers={"content-type": "application/json"}) as r:
            assert r.status == 400
            err = await r.json()
        async with s.get(proxy.url + "/metrics") as r:
            worst = _sample(await r.text(), _LAG)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert worst < 1.5, f"the event loop stalled {worst:.2f} s on one request"
