"""The splice check reads each choice on its own, and by its content as well as its ids.

One id was kept for the whole stream (red9 F2): SGLang, whose `n>1` choices each carry their own
id, was cut at choice 1's first chunk; a usage chunk with an id of its own ended a whole answer
with an error and lost the upstream's usage; and every such cut was charged to the deployment's
health (six honest `n=2` requests opened its circuit). Now ids are kept per choice, usage-only
chunks are not judged, and a cut for a splice is the answer's, not the deployment's.

An answer begins with its `role` delta: one for a choice that already had content (in a chunk
without a role) is a second answer, whatever its id (red9 F3: a second half with empty ids, or
with the same id). What cannot be told from an answer goes on: a second answer that starts
without a role, and one spliced right after a choice's first chunk (servers that send the role
on every chunk, Ollama and TGI, look the same)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeroute import sse
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.test_stream_hold_usage_and_format import _streaming
from tests.test_stream_spliced_ids import DONE, _chunk, _usage

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]
ROLE = {"role": "assistant", "content": ""}
# SGLang's `n=2`: each choice a sub-request of its own id; the usage chunk takes the last one's.
SGLANG_N2 = [
    _chunk("rid0", ROLE, index=0),
    _chunk("rid0", {"content": "Hello"}, index=0),
    _chunk("rid1", ROLE, index=1),
    _chunk("rid1", {"content": "Howdy"}, index=1),
    _chunk("rid0", {"content": " there"}, index=0),
    _chunk("rid1", {"content": " partner"}, index=1),
    _chunk("rid0", {}, "stop", index=0),
    _chunk("rid1", {}, "stop", index=1),
    _usage("rid1"),
    DONE,
]
# A usage chunk whose id is its own (a pydantic chunk built without `id=` mints one).
USAGE_NEW_ID = [
    _chunk("a1", ROLE),
    _chunk("a1", {"content": "complete answer"}),
    _chunk("a1", {}, "stop"),
    _usage("chatcmpl-fresh"),
    DONE,
]
# Ollama and TGI send the role on every chunk, and an empty one now and then.
ROLE_EVERY_CHUNK = [
    _chunk("o", {"role": "assistant", "content": "Hello"}),
    _chunk("o", {"role": "assistant", "content": ""}),
    _chunk("o", {"role": "assistant", "content": " there"}),
    _chunk("o", {"role": "assistant", "content": ""}, "stop"),
    DONE,
]


def _spliced(second_id: str) -> list[bytes]:
    """An answer cut after content, then a second answer that begins with its role delta."""
    return [
        _chunk("c1", ROLE),
        _chunk("c1", {"content": "Hello"}),
        _chunk("c1", {"content": " whole"}),
        _chunk(second_id, ROLE),
        _chunk(second_id, {"content": "OTHER ANSWER"}),
        _chunk(second_id, {}, "stop"),
        DONE,
    ]


async def _proxy(start_proxy: StartProxy, serve_routes: ServeRoutes, events: list[bytes]) -> Proxy:
    up = await serve_routes(web.post("/v1/chat/completions", _streaming(events)))
    return await start_proxy(
        {
            "providers": {"p": {"base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )


async def _texts(proxy: Proxy, **kw: Any) -> tuple[dict[int, str], Exception | None]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    texts: dict[int, str] = {}
    error = None
    try:
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True, **kw)
        async for c in stream:
            for ch in c.choices:
                texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    except openai.APIError as e:
        error = e
    finally:
        await client.close()
    return texts, error


async def _health(proxy: Proxy) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
        d: dict[str, Any] = (await r.json())["deployments"][0]
        return d


async def test_sglang_choices_of_their_own_ids_are_one_answer(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, SGLANG_N2)
    for i in range(6):
        texts, error = await _texts(proxy, n=2, stream_options={"include_usage": True})
        assert (texts, error) == ({0: "Hello there", 1: "Howdy partner"}, None)
        rec = await recorded(proxy, i + 1)
        assert rec.outcome == "ok" and rec.usage is not None
        assert (rec.usage.completion_tokens, rec.usage.estimated) == (2, False)  # the upstream's own
    health = await _health(proxy)
    assert (health["circuit"], health["failures"]) == ("closed", 0)


async def test_a_usage_chunk_with_an_id_of_its_own_ends_nothing(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, USAGE_NEW_ID)
    texts, error = await _texts(proxy, stream_options={"include_usage": True})
    assert (texts, error) == ({0: "complete answer"}, None)
    rec = await recorded(proxy)
    assert rec.outcome == "ok" and rec.usage is not None and rec.usage.completion_tokens == 2


async def test_a_server_that_sends_the_role_on_every_chunk_is_not_cut(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, ROLE_EVERY_CHUNK)
    texts, error = await _texts(proxy)
    assert (texts, error) == ({0: "Hello there"}, None)


@pytest.mark.parametrize("second_id", ["", "c1", "c2"], ids=["empty-id", "same-id", "new-id"])
async def test_a_second_answer_that_begins_with_its_role_is_cut_and_the_deployment_not_charged(
    start_proxy: StartProxy, serve_routes: ServeRoutes, second_id: str
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, _spliced(second_id))
    for i in range(6):
        texts, error = await _texts(proxy)
        assert texts == {0: "Hello whole"}
        assert error is not None and "second answer" in str(error)
        rec = await recorded(proxy, i + 1)
        assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error")
    health = await _health(proxy)  # the answer's cut, not the deployment's failure
    assert (health["circuit"], health["failures"]) == ("closed", 0), health


def _other(chunks: list[tuple[Any, dict[str, Any]]]) -> list[bool]:
    ids = sse.AnswerId()
    return [ids.other(cid, [choice]) for cid, choice in chunks]


def _c(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish}


def test_what_the_check_reads() -> None:
    text = _c({"content": "x"})
    # Ids per choice: a choice's own first id is not a splice; a change after one repeated is.
    assert _other([("A", _c(ROLE)), ("A", text), ("B", _c(ROLE, 1)), ("B", _c({"content": "y"}, 1))]) == [False] * 4
    assert _other([("A", _c(ROLE)), ("A", text), ("B", text)]) == [False, False, True]
    # A role after content in a chunk without one, after a finish too; not one with a finish.
    assert _other([("", _c(ROLE)), ("", text), ("", _c(ROLE))]) == [False, False, True]
    assert _other([("", _c(ROLE)), ("", text), ("", _c(ROLE, finish="stop"))]) == [False, False, False]
    assert _other([("", _c(ROLE)), ("", text), ("", _c({}, finish="stop")), ("", _c(ROLE))]) == [False] * 3 + [True]
    # Another id after a finish: a second answer (its role chunk and usage went on).
    assert _other([("A", _c(ROLE)), ("A", text), ("A", _c({}, finish="stop")), ("B", _c(ROLE))]) == [False] * 3 + [True]
    # Unseen: a second answer without a role delta, or spliced after the first chunk.
    assert _other([("", _c(ROLE)), ("", text), ("", _c({"content": "OTHER"}))]) == [False] * 3
    assert _other([("A", _c({"role": "assistant", "content": "Hi"})), ("B", _c(ROLE))]) == [False, False]
    # A usage-only chunk is not judged (ChatChunks passes it no choices).
    ids = sse.AnswerId()
    assert not ids.other("A", [_c(ROLE)]) and not ids.other("A", [text])
    assert not ids.other("U", [])
