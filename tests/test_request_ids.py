"""The proxy's request ids (`x-request-id`, the ledger's and the request log's key): unique,
not guessable from a neighbour's, and in the order they were issued, so that the stores'
indexes on them grow at one end instead of at random pages."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from typing import Any

import openai

from edgeroute.request_input import new_request_id
from tests.conftest import Proxy

SHAPE = re.compile(r"req_[0-9a-f]{24}")


def _config(up: Any) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": up.base_url}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }


async def _ids(proxy: Proxy, n: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    out = []
    for _ in range(n):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hello"}]
        )
        out.append(raw.headers["x-request-id"])
        await asyncio.sleep(0.002)  # ids a millisecond or more apart are ordered
    await client.close()
    return out


async def test_answers_carry_ids_in_the_order_they_were_issued(start_upstream, start_proxy) -> None:
    proxy = await start_proxy(_config(await start_upstream()))
    ids = await _ids(proxy, 20)
    assert all(SHAPE.fullmatch(i) for i in ids), ids
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_issued_in_one_millisecond_are_distinct_and_do_not_count_up() -> None:
    ids = [new_request_id() for _ in range(20_000)]  # several buffers' worth
    assert len(set(ids)) == len(ids)
    tails = [int(i[-14:], 16) for i in ids]
    # A counter (what let a client name its neighbours' ids) would step by one.
    assert sum(1 for a, b in itertools.pairwise(tails) if abs(a - b) <= 16) < 3


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_request_id()  # the parent's buffer is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without running the parent's clean-up
        os.close(read)
        os.write(write, ",".join(new_request_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split(",")
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(50)]
    assert len(child) == 50
    assert not {i[-14:] for i in child} & {i[-14:] for i in parent}
