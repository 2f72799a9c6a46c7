"""A key an upstream quotes inside JSON it writes into its message (a gateway relaying the JSON
error of the server behind it: `{"detail": "Invalid API key:\\nvllm-key-4821"}`) is redacted
wherever edgeroute writes that text, not only in the request log's stored content. Redaction
read the raw spelling: the escape's letter glued to the key (`\\nvllm-…`: no token boundary
for a short key matched as a whole token, none for the `sk-` shape), `\\u0073k-…` after an
escape was no `sk-` either, so the client's error, the JSON log line and the request log's
attempt error showed the key once the client's JSON parser read the escape."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
from aiohttp import web

from edgeroute import redact
from tests.conftest import ServeRoutes
from tests.serve_support import start_serve
from tests.test_requestlog import _wait_for
from tests.test_serve import wait_ready

PROVIDER_KEY = "vllm-key-4821"  # a self-hosted server's short key (`vllm serve --api-key ...`)
OTHER_KEY = "sk-live-Ab3dEf6hIj9kLm2nOp5q"  # a key of the server behind the gateway: a shape only
# (case, what the gateway writes before the key in the raw JSON it quotes, how it spells the key)
CASES = {
    "newline": ("\\n", None),
    "escaped quote": ('\\"', None),
    "tab": ("\\t", None),
    "unicode escape": ("\\n", lambda k: "".join(f"\\u{ord(c):04x}" for c in k[:2]) + k[2:]),
}


def _quoted(case: str, key: str) -> str:
    before, spelled = CASES[case]
    return before + (spelled(key) if spelled else key)


async def _gateway(request: web.Request) -> web.Response:
    """Relays the JSON error of the server behind it as its message, quoting the key it was sent
    and the one it holds; 401 for the case `refused` (a line in edgeroute's log)."""
    case = (await request.json())["messages"][0]["content"]
    sent = request.headers["Authorization"].removeprefix("Bearer ")
    if case == "refused":
        inner = '{"detail": "Invalid API key:' + "".join(_quoted(c, sent) for c in CASES) + '"}'
        return web.json_response({"error": {"message": inner, "type": "auth"}}, status=401)
    inner = '{"detail": "Invalid API key:' + _quoted(case, sent) + ", upstream key:" + _quoted(case, OTHER_KEY) + '"}'
    return web.json_response({"error": {"message": inner, "type": "invalid_request_error"}}, status=400)


def _leaks(text: str) -> list[str]:
    """What of either key `text` shows, read as JSON's escapes read (the client's view)."""
    read = text.replace('\\"', '"')
    for c in "ntu":
        read = read.replace(f"\\{c}", " ")
    return [k for k in (PROVIDER_KEY, OTHER_KEY, PROVIDER_KEY[2:], OTHER_KEY[2:]) if k in text or k in read]


async def test_a_key_after_a_json_escape_in_an_upstreams_message_is_redacted_everywhere(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    up = await serve_routes(web.post("/v1/chat/completions", _gateway))
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": up.url + "/v1", "api_key": PROVIDER_KEY}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1}}},
        "models": {"m": {"deployments": ["d"]}},
        "ledger": {"path": str(tmp_path / "log.db"), "flush_interval": 0.05},
        "request_log": {"log_content": "full"},
    }
    serving = await start_serve(tmp_path / "c.yaml", cfg, "--log-format", "json")
    leaked: list[str] = []
    ids: list[str] = []
    try:
        await wait_ready(serving.url)
        client = openai.AsyncOpenAI(base_url=serving.url + "/v1", api_key="unused", max_retries=0)
        for case in [*CASES, "refused"]:
            try:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": case}])
            except openai.APIStatusError as e:
                ids.append(e.response.headers["x-request-id"])
                said = json.dumps(e.body)
                assert case == "refused" or "upstream key:" in said, said  # the upstream's message, relayed
                leaked += [f"client, {case}: {k} in {said}" for k in _leaks(said)]
            else:
                raise AssertionError(f"{case}: the upstream's error was not relayed")
        await client.close()
        async with aiohttp.ClientSession() as s:
            listed = await _wait_for(s, serving.url + "/admin/requests?limit=10", len(CASES) + 1)
            assert len(listed["data"]) == len(CASES) + 1, listed
            for rid in ids:
                async with s.get(serving.url + f"/admin/requests/{rid}") as r:
                    stored = await r.text()
                leaked += [f"request log: {k} in {stored}" for k in _leaks(stored)]
    finally:
        serving.proc.terminate()
        _, err = await asyncio.wait_for(serving.proc.communicate(), 20)
    log = err.decode()
    lines = [line for line in log.splitlines() if "refused our credentials" in line]
    assert lines, log  # the operator is told, in a JSON line
    json.loads(lines[0])
    leaked += [f"log: {k} in {line}" for line in log.splitlines() for k in _leaks(line)]
    assert not leaked, "\n".join(leaked)


def test_one_function_reads_escapes_in_any_text() -> None:
    """`redact.text` (every exit's) as the request log's content masking reads: JSON strings
    decoded (`\\"api_key\\": \\"…\\"` inside a message), escapes outside JSON as the spaces
    they stand for (a log line's values are written with them)."""
    assert (
        redact.text('{"m": "{\\"api_key\\": \\"abc123verysecret\\"}"}') == '{"m": "{\\"api_key\\": \\"[REDACTED]\\"}"}'
    )
    assert redact.text(f"said b'key:\\n{OTHER_KEY}\\tAuthorization:\\nBearer abcdefghijkl'") == (
        "said b'key:\\n[REDACTED]\\tAuthorization:[REDACTED]\\nBearer [REDACTED]'"
    )
    assert redact.text("C:\\\\new\\\\temp, line\\none") == "C:\\\\new\\\\temp, line\\none"  # nothing else changes
