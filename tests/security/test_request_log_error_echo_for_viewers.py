"""A request's stored content is an admin's to read: a viewer key (a dashboard's, a team's
viewer) opening a request gets `content: null, content_withheld: true`. Yet with content kept
(`log_content: full`), an attempt's error is kept as the upstream wrote it, and upstreams
quote the prompt in their errors (a vLLM/FastAPI validation error's `input`): the viewer read
the prompt, personal data included, in `attempts[].error`. A caller who may not read the
content now gets each error as it is stored with content off (edgeroute's own words only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.security.governed import ROOT, call
from tests.security.test_request_log_upstream_error_echo import EMAIL, PROMPT, echo_config
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _wait_for

VIEWER = "tok-viewer-0123456789"


async def test_a_viewer_reads_no_prompt_in_an_attempts_error(start_upstream: Any, tmp_path: Path) -> None:
    cfg = await echo_config(start_upstream, tmp_path, {"log_content": "full"})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}, "viewer": {"token": VIEWER, "role": "viewer"}}
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ROOT, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": PROMPT}]
        )
        await client.close()
        assert raw.headers["x-edgeroute-deployment"] == "d-good"  # failed over past the echo
        s.headers["Authorization"] = f"Bearer {ROOT}"
        await _wait_for(s, proxy.url + "/admin/requests?limit=5", 1)
        one = proxy.url + f"/admin/requests/{raw.headers['x-request-id']}"

        status, seen = await call(s, "GET", one, VIEWER)
        assert status == 200, seen
        assert seen["content"] is None and seen["content_withheld"] is True
        first = seen["attempts"][0]
        assert first["deployment"] == "d-bad"
        assert "diagnosis" not in str(seen) and EMAIL not in str(seen), first["error"]
        assert first["status"] == 500 and "upstream's message, not kept" in first["error"]  # the status stays

        # The admin, who may read the prompt, reads the error as the upstream wrote it.
        status, full = await call(s, "GET", one, ROOT)
        assert status == 200 and full["content"]["request"] is not None
        assert "diagnosis" in full["attempts"][0]["error"] and EMAIL in full["attempts"][0]["error"]
