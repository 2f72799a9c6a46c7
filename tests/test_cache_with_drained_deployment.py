"""The response cache and drained deployments.

Draining a deployment (`POST /admin/deployments/{name}/drain`, or `drained: true`) takes it
out of every model's list: no new request goes there. Its past answers were not wrong, yet
the cache served an answer only if its deployment was in the request's routing order, so a
drain turned every answer it had produced into a miss (paid again elsewhere) and took away
the stale-if-error fallback when the remaining deployments failed. A drained deployment's
answers are now served as long as the request's rule (PII, tags, residency) would allow that
deployment, were it in service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, eventually, simple_config
from tests.governance_support import call, write_config

QUESTION = [{"role": "user", "content": "Name a colour."}]


async def _served(start_upstream: Any, tmp_path: Path, **cache: Any) -> tuple[ProxyTestServer, str, Any, Any]:
    """d-a (cheaper, answers first) and d-b (tagged private) behind model `m`, cached."""
    a, b = await start_upstream(record=True), await start_upstream(record=True)
    cfg = simple_config({"a": a, "b": b})
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    cfg["models"]["m"]["cache"] = {"ttl": 60, "scope": "global"} | cache
    cfg["deployments"]["d-b"]["price"] = {"input_per_mtok": 5.0, "output_per_mtok": 10.0}
    cfg["deployments"]["d-b"]["tags"] = ["privacy:high"]
    cfg["rules"] = [{"name": "private", "when": {"tags": ["private"]}, "then": {"require_tags": ["privacy:high"]}}]
    cfg["keys"] = {"ops": {"token": "tok-ops", "role": "operator"}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)))
    await server.start_server()
    return server, f"http://127.0.0.1:{server.port}", a, b


async def _cache_a_answer_of_d_a(url: str) -> tuple[openai.AsyncOpenAI, str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="tok-ops", max_retries=0)
    first = await client.chat.completions.with_raw_response.create(model="m", messages=QUESTION, temperature=0)
    assert first.headers["x-edgeroute-deployment"] == "d-a"

    async def stored() -> bool:  # the store is written off the request path
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=QUESTION, temperature=0)
        return raw.headers["x-edgeroute-cache"] == "hit"

    await eventually(stored, "d-a's answer in the cache")
    content = first.parse().choices[0].message.content
    assert content is not None
    status, body = await call("POST", url + "/admin/deployments/d-a/drain", "tok-ops")
    assert status == 200, body
    return client, content


async def test_a_drained_deployments_fresh_answer_is_still_served(start_upstream: Any, tmp_path: Path) -> None:
    server, url, a, b = await _served(start_upstream, tmp_path)
    try:
        client, content = await _cache_a_answer_of_d_a(url)
        sent = len(a.options.requests)
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=QUESTION, temperature=0)
        assert raw.headers["x-edgeroute-cache"] == "hit", raw.headers
        assert raw.headers["x-edgeroute-deployment"] == "d-a"
        assert raw.parse().choices[0].message.content == content
        assert len(a.options.requests) == sent and not b.options.requests
        # The drain holds for new questions: they go to d-b.
        other = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "Name a fruit."}], temperature=0
        )
        assert other.headers["x-edgeroute-deployment"] == "d-b" and len(a.options.requests) == sent
        # A request whose rule would not allow d-a, even in service, does not get its answer.
        private = await client.chat.completions.with_raw_response.create(
            model="m", messages=QUESTION, temperature=0, extra_headers={"x-edgeroute-tags": "private"}
        )
        assert private.headers["x-edgeroute-cache"] == "miss"
        assert private.headers["x-edgeroute-deployment"] == "d-b" and len(b.options.requests) == 2
        await client.close()
    finally:
        await server.close()


async def test_a_drained_deployments_stale_answer_is_served_when_the_rest_fail(
    start_upstream: Any, tmp_path: Path
) -> None:
    server, url, a, b = await _served(start_upstream, tmp_path, ttl=1, stale_if_error=600)
    try:
        client, content = await _cache_a_answer_of_d_a(url)
        b.options.fail_status = 503  # every deployment in service fails

        async def expired() -> bool:  # past its ttl: served only as stale-if-error
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m", messages=QUESTION, temperature=0
                )
            except openai.APIStatusError as e:
                assert e.status_code in (502, 503), e  # old code: the drained answer is not servable
                return False
            return raw.headers["x-edgeroute-cache"] == "stale" and raw.parse().choices[0].message.content == content

        sent = len(a.options.requests)
        await eventually(expired, "d-a's answer served stale")
        assert len(a.options.requests) == sent, "a drained deployment got a new request"
        await client.close()
    finally:
        await server.close()


async def test_a_drained_deployments_embeddings_are_still_served(start_upstream: Any, tmp_path: Path) -> None:
    server, url, a, b = await _served(start_upstream, tmp_path)
    try:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="tok-ops", max_retries=0)
        first = await client.embeddings.with_raw_response.create(model="m", input="Paris")
        assert first.headers["x-edgeroute-deployment"] == "d-a"

        async def stored() -> bool:
            raw = await client.embeddings.with_raw_response.create(model="m", input="Paris")
            return raw.headers["x-edgeroute-cache"] == "hit"

        await eventually(stored, "d-a's vectors in the cache")
        status, body = await call("POST", url + "/admin/deployments/d-a/drain", "tok-ops")
        assert status == 200, body
        sent = len(a.options.requests)
        raw = await client.embeddings.with_raw_response.create(model="m", input="Paris")
        assert raw.headers["x-edgeroute-cache"] == "hit" and raw.headers["x-edgeroute-deployment"] == "d-a"
        assert raw.parse().data[0].embedding == first.parse().data[0].embedding
        assert len(a.options.requests) == sent and not b.options.requests
        await client.close()
    finally:
        await server.close()
