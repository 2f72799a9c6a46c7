"""An upstream's error that quotes the prompt, with the request log's content off.

Content is private by default: with `log_content: none` the request log stores no prompt.
Yet an attempt's error text was stored as the upstream wrote it (credentials alone replaced),
and upstreams quote the request in their errors: a vLLM/FastAPI validation error carries the
offending `input`, a filter names what it matched. The prompt, personal data included, was in
every admin's view of the request. Now, with content off, only edgeroute's own messages are
kept, not the upstream's words (its status and the outcome stay); `redacted` masks PII; `full`
keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _wait_for

EMAIL = "jan.novak@example.cz"
PROMPT = f"my diagnosis is confidential, write to {EMAIL}"
CHEAP, DEAR = {"input_per_mtok": 1, "output_per_mtok": 1}, {"input_per_mtok": 2, "output_per_mtok": 2}
# What a vLLM server (FastAPI's validation) answers with a 500 here: the input quoted back.
ECHO = (
    "[{'type': 'value_error', 'loc': ('body', 'messages', 0, 'content'), "
    f"'input': '{PROMPT}', 'ctx': {{'error': 'tokenizer failed'}}}}]"
)


async def echo_config(start_upstream: Any, tmp_path: Path, request_log: dict[str, Any]) -> dict[str, Any]:
    """Model `m`: first a deployment whose 500 quotes the prompt (`ECHO`), then a good one."""
    bad = await start_upstream(fail_status=500, fail_message=ECHO)
    good = await start_upstream()
    return {
        "providers": {"bad": {"base_url": bad.base_url}, "good": {"base_url": good.base_url}},
        "deployments": {
            "d-bad": {"provider": "bad", "model": "gpt-4o", "price": CHEAP},  # the first try
            "d-good": {"provider": "good", "model": "gpt-4o", "price": DEAR},
        },
        "models": {"m": {"deployments": ["d-bad", "d-good"], "strategy": "lowest_cost"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "request_log": request_log,
    }


async def _stored_error(start_upstream: Any, tmp_path: Path, request_log: dict[str, Any]) -> Any:
    cfg = await echo_config(start_upstream, tmp_path, request_log)
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": PROMPT}]
        )
        await client.close()
        assert raw.headers["x-edgeroute-deployment"] == "d-good"  # failed over past the echo
        async with aiohttp.ClientSession() as s:
            await _wait_for(s, proxy.url + "/admin/requests?limit=5", 1)
            async with s.get(proxy.url + f"/admin/requests/{raw.headers['x-request-id']}") as r:
                one = await r.json()
    (first, _) = one["attempts"]
    assert first["deployment"] == "d-bad" and first["error"], one
    return one, first["error"]


async def test_with_content_off_an_upstream_error_quoting_the_prompt_is_stored_without_it(
    start_upstream: Any, tmp_path: Path
) -> None:
    one, error = await _stored_error(start_upstream, tmp_path, {})
    assert one["content"] is None
    assert "diagnosis" not in str(one) and EMAIL not in str(one), error
    # The upstream's words are not kept at all (they may carry the prompt unquoted): its status
    # and the attempt's outcome say what happened.
    assert error == "[the upstream's message, not kept with content off]", error
    (first, _) = one["attempts"]
    assert first["status"] == 500 and first["outcome"] == "server_error", first


@pytest.mark.parametrize(("mode", "kept"), [("redacted", False), ("full", True)])
async def test_content_kept_keeps_the_error_as_its_mode_keeps_the_prompt(
    start_upstream: Any, tmp_path: Path, mode: str, kept: bool
) -> None:
    _, error = await _stored_error(start_upstream, tmp_path, {"log_content": mode})
    assert "diagnosis" in error and (EMAIL in error) is kept, error
