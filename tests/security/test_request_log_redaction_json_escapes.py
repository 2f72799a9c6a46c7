"""`log_content: redacted` masks PII as the text reads, not as its JSON encoding is spelled.

Redaction ran on the raw JSON of the body and the answer: in `"My card:\\n4111111111111111"` the
escape's `n` glued to the number (no word boundary, no card), and a separator JSON writes as
`\\u00a0` or `\\uff20` (no-break spaces in a card, a full-width `@`) was never seen as one. Routing
decodes and saw every one of them; the stored prompt and answer kept them in clear. A credential
after a newline (`\\nsk-proj-…`) was likewise kept, with `full` content too. The values are red
team P's (F2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.security.test_request_log_upstream_error_echo import echo_config
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _wait_for

# (text as the user writes it, the value that must not be stored).
LEAKS = {
    "card after a newline": ("My card:\n4111111111111111", "4111111111111111"),
    "ssn after a newline": ("SSN:\n078-05-1120", "078-05-1120"),
    "iban after a tab": ("IBAN:\tDE89370400440532013000", "DE89370400440532013000"),
    "card with no-break spaces": ("card 4111\u00a01111\u00a01111\u00a01111", "4111\\u00a01111"),
    "e-mail with a full-width @": ("mail jane.doe\uff20example.com", "jane.doe"),
    "phone with thin spaces": ("call +1\u2009415\u2009555\u20090132", "0132"),
}
JSON = {"content-type": "application/json"}
SECRET = "sk-proj-" + "Q7" * 20
# An upstream's answer (`orjson` escapes a tab as `\t`); the bundled mock answers a header's text.
ANSWER = "IBAN:\tDE89370400440532013000, card:\t4111111111111111"


def _cfg(up: str, tmp_path: Path, mode: str) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": up}, "t": {"base_url": up, "headers": {"x-mock-content": ANSWER}}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}, "t": {"provider": "t", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}, "tabs": {"deployments": ["t"]}},
        "ledger": {"path": str(tmp_path / "log.db"), "flush_interval": 0.05},
        "request_log": {"log_content": mode},
    }


async def _stored(proxy_url: str, ids: list[str]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        await _wait_for(s, proxy_url + "/admin/requests?limit=50", len(ids))
        out = []
        for rid in ids:
            async with s.get(proxy_url + f"/admin/requests/{rid}") as r:
                assert r.status == 200
                out.append(await r.json())
    return out


async def test_redacted_content_masks_pii_next_to_json_escapes(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(reply_words=3)  # the mock's answer echoes the prompt
    async with cost_proxy(_cfg(up.base_url, tmp_path, "redacted")) as proxy:
        # The SDK escapes control characters (`\n`, `\t`); a client on Python's json.dumps
        # defaults (ensure_ascii, as red team P's repro) every non-ASCII one too (`\u00a0`).
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        ids = []
        for text, _ in LEAKS.values():
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": text}]
            )
            ids.append(raw.headers["x-request-id"])
        async with aiohttp.ClientSession() as s:
            for text, _ in LEAKS.values():
                body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
                async with s.post(proxy.url + "/v1/chat/completions", data=body, headers=JSON) as r:
                    assert r.status == 200, await r.text()
                    ids.append(r.headers["x-request-id"])
        raw = await client.chat.completions.with_raw_response.create(
            model="tabs", messages=[{"role": "user", "content": "hello"}]
        )
        assert raw.parse().choices[0].message.content == ANSWER
        ids.append(raw.headers["x-request-id"])
        await client.close()
        *stored, answered = await _stored(proxy.url, ids)
    leaked = []
    for (name, (_, value)), one in zip([*LEAKS.items(), *LEAKS.items()], stored, strict=True):
        c = one["content"]
        assert c["mode"] == "redacted"
        prompt = json.loads(c["request"])["messages"][0]["content"]  # still JSON, as it was sent
        if value in c["request"] or value in prompt or "[PII:" not in prompt:
            leaked.append(f"{name}: {c['request']}")
    # The answer too, as the upstream wrote it (JSON) and as stored (still JSON).
    answer = json.loads(answered["content"]["response"])["choices"][0]["message"]["content"]
    if answer != "IBAN:\t[PII:iban], card:\t[PII:payment_card]":
        leaked.append(f"answer: {answered['content']['response']}")
    assert not leaked, "\n".join(leaked)


async def test_stored_content_masks_a_credential_after_an_escape(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(reply_words=3)
    async with cost_proxy(_cfg(up.base_url, tmp_path, "full")) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": f"my key:\n{SECRET}\nkeep it"}]
        )
        await client.close()
        (one,) = await _stored(proxy.url, [raw.headers["x-request-id"]])
    c = one["content"]
    assert SECRET not in str(c) and "[REDACTED]" in c["request"] and "[REDACTED]" in c["response"], c
    assert json.loads(c["request"])["messages"][0]["content"] == "my key:\n[REDACTED]\nkeep it"
    assert (tmp_path / "log.db").exists() and SECRET.encode() not in (tmp_path / "log.db").read_bytes()


async def test_redacted_error_text_masks_pii_next_to_json_escapes(start_upstream: Any, tmp_path: Path) -> None:
    """An upstream's error quoting the prompt in JSON (`"input": "…\\n4111…"`), content `redacted`."""
    echo = json.dumps({"detail": [{"type": "value_error", "input": "My card:\n4111111111111111"}]})
    cfg = await echo_config(start_upstream, tmp_path, {"log_content": "redacted"})
    bad = await start_upstream(fail_status=500, fail_message=echo)
    cfg["providers"]["bad"]["base_url"] = bad.base_url
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hello"}]
        )
        await client.close()
        assert raw.headers["x-edgeroute-deployment"] == "d-good"
        (one,) = await _stored(proxy.url, [raw.headers["x-request-id"]])
    first = one["attempts"][0]
    assert first["deployment"] == "d-bad" and "value_error" in first["error"], one
    assert "4111111111111111" not in first["error"] and "[PII:payment_card]" in first["error"], first["error"]
