"""A failed shadow mirror's log line, with the request log's content off.

A mirror's failure was logged at INFO with the upstream's error message as it came
(`shadow request <id> failed: <message>`), and upstreams quote the request in their errors
(a vLLM/FastAPI validation error's `input`): the client's prompt, personal data included, went
to the process's log, which keeps no prompt anywhere else. The line now names the request, the
candidate's deployment and the status and error type, not the upstream's text.
"""

from __future__ import annotations

import logging
from typing import Any

import openai
import pytest

from tests.conftest import eventually

EMAIL = "jan.novak@example.cz"
PROMPT = f"my diagnosis is confidential, write to {EMAIL}"
ECHO = f"[{{'type': 'value_error', 'loc': ('body', 'messages', 0, 'content'), 'input': '{PROMPT}'}}]"


async def test_a_failed_mirror_is_logged_without_the_upstreams_echo_of_the_prompt(
    start_upstream: Any, start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    good = await start_upstream()
    bad = await start_upstream(fail_status=400, fail_message=ECHO, record=True)
    proxy = await start_proxy(
        {
            "providers": {"a": {"base_url": good.base_url}, "b": {"base_url": bad.base_url}},
            "deployments": {
                "cheap": {"provider": "a", "model": "gpt-4o-mini"},
                "strong": {"provider": "b", "model": "gpt-4o"},
            },
            "models": {
                "m": {"deployments": ["cheap"], "shadow": {"model": "s", "percent": 100}},
                "s": {"deployments": ["strong"]},
            },
        }
    )
    caplog.set_level(logging.INFO, logger="edgeroute")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": PROMPT}]
    )
    await client.close()
    rid = raw.headers["x-request-id"]

    async def failed() -> list[str] | None:
        lines = [r.getMessage() for r in caplog.records if r.name == "edgeroute.shadow" and rid in r.getMessage()]
        return lines or None

    (line,) = await eventually(failed, "the mirror's failure logged")
    assert bad.options.requests, "the premise: the mirror reached the candidate and was refused"
    assert "400" in line and "strong" in line, line
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "diagnosis" not in logged and EMAIL not in logged, logged
