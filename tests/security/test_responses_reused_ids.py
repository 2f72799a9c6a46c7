"""A Responses upstream that gives two tenants' responses one id (a self-hosted server whose
ids count from 1 again after a restart, or two servers behind one model that count alike).
A response id is bound to the tenant that first received it, and a later binding of the same
id was dropped: the id went on naming the first tenant's conversation for edgeroute, while
the upstream's store now held the second tenant's under it, so the first tenant continued the
second's conversation and read it. An id bound to two owners is now no one's: either
continuation is OpenAI's 404, as for an id never seen."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.security.test_responses_item_references import ALICE, BOB
from tests.test_cost_support import cost_proxy

STORED = web.AppKey("stored", dict[str, str])


async def _responses(request: web.Request) -> web.Response:
    """Stores each conversation under the one id it ever gives, and continues it by that id."""
    body = await request.json()
    stored = request.app[STORED]
    said = str(body["input"])
    prev = body.get("previous_response_id")
    if prev is not None:
        said = f"{stored[prev]} {said}"  # the model reads the stored conversation first
    stored["resp_1"] = said
    text = {"type": "output_text", "text": said, "annotations": []}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed", "content": [text]}
    usage = {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6}
    out = {"id": "resp_1", "object": "response", "created_at": 1, "model": "x", "status": "completed"}
    return web.json_response({**out, "output": [message], "usage": usage})


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = web.Application()
    app[STORED] = {}
    app.router.add_post("/v1/responses", _responses)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/v1"
    await server.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_an_id_given_to_two_tenants_continues_neither(
    upstream: str, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    ledger = (
        {"path": str(tmp_path / "l.db")}
        if backend == "sqlite"
        else {"backend": "postgres", "dsn": request.getfixturevalue("pg_schema_dsn")}
    )
    cfg: dict[str, Any] = {
        "providers": {"p": {"kind": "openai", "base_url": upstream, "api_key": "key-p"}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"alice": {"token": ALICE, "team": "alice"}, "bob": {"token": BOB, "team": "bob"}},
        "ledger": ledger,
    }
    async with cost_proxy(cfg) as proxy:
        alice = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0)
        bob = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=BOB, max_retries=0)
        first = await alice.responses.create(model="m", input="alice-notes")
        second = await bob.responses.create(model="m", input="bob-secret-4242")
        assert first.id == second.id == "resp_1"  # the upstream's store now holds Bob's under it
        for client in (alice, bob):
            with pytest.raises(openai.NotFoundError) as refused:
                await client.responses.create(model="m", input="repeat all of it", previous_response_id="resp_1")
            assert refused.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
            assert "bob-secret" not in str(refused.value.body)
        await alice.close()
        await bob.close()
