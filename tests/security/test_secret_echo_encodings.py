"""An upstream echoing the provider key it was sent in another encoding than the ones known:
upper- or lower-cased, base64 (standard or URL-safe, padded or not), base64 of a `user:key`
Basic-auth pair (as it would quote an `Authorization: Basic` header back, without the scheme
word), hex (either case). Only the key as written and its URL-encodings were known, so each of
these reached the tenant (a relayed error, a stream's error event), the structured logs and the
request log, and anyone who decoded it held the key.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import redact, sse
from edgeroute.telemetry import logs
from tests.conftest import ServeRoutes, eventually
from tests.security.governed import ROOT, call
from tests.test_cost_support import cost_proxy

KEY = "Zq8vT2mN5pL1+xR7/wK3yH9cF4=vQ"  # shapeless (a self-hosted provider's), with `+`, `/` and `=`
SAID = "Unsupported value in header, got"  # no words that say our key was refused (those messages are replaced)
CONTENT = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x"}


def _percent(s: str, which: Callable[[int], bool]) -> str:
    return "".join(f"%{ord(c):02X}" if which(i) else c for i, c in enumerate(s))


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


# How the upstream writes the key it received; the Basic pairs put it at each of base64's three alignments.
FORMS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "lower": str.lower,
    "base64": _b64,
    "base64-unpadded": lambda k: _b64(k).rstrip("="),
    "base64-urlsafe": lambda k: base64.urlsafe_b64encode(k.encode()).decode(),
    "base64-urlsafe-unpadded": lambda k: base64.urlsafe_b64encode(k.encode()).decode().rstrip("="),
    "basic-a": lambda k: _b64(f"a:{k}"),
    "basic-ab": lambda k: _b64(f"ab:{k}"),
    "basic-apikey": lambda k: _b64(f"apikey:{k}"),
    "hex": lambda k: k.encode().hex(),
    "hex-upper": lambda k: k.encode().hex().upper(),
    # Percent-encoded as a URL quoting the key would hold it: every byte (some encoders escape
    # letters too), in lower-case hex, every other character, and twice (a URL encoded again).
    "percent-every-byte": lambda k: _percent(k, lambda i: True),
    "percent-every-byte-lower": lambda k: _percent(k, lambda i: True).lower(),
    "percent-every-other": lambda k: _percent(k, lambda i: i % 2 == 1),
    "percent-twice": lambda k: quote(quote(k, safe=""), safe=""),
}


# How a JSON encoder may write the key inside the error's JSON: every slash escaped (PHP's
# `json_encode`), or its signs as `\u00XX` escapes. The client's JSON parser gives the key back.
ESCAPED: dict[str, Callable[[str], str]] = {
    "json-slashes": lambda k: k.replace("/", "\\/"),
    "json-unicode": lambda k: "".join(c if c.isalnum() and c != "T" else f"\\u{ord(c):04x}" for c in k),
}


def _error_json(form: str, key: str, etype: str) -> bytes:
    if form in ESCAPED:
        return b'{"error":{"message":"%s: %s","type":"%s"}}' % (
            SAID.encode(),
            ESCAPED[form](key).encode(),
            etype.encode(),
        )
    return orjson.dumps({"error": {"message": f"{SAID}: {FORMS[form](key)}", "type": etype}})


def exposes(text: str) -> list[str]:
    """How `text` gives the key away: in any case, or inside a run of base64 or hex that decodes to it."""
    found = ["cased"] if KEY.lower() in text.lower() else []
    found += ["percent-encoded"] if KEY.lower() in unquote(unquote(text)).lower() else []
    for run in re.findall(r"[A-Za-z0-9+/_\-]{8,}", text):
        std = run.replace("-", "+").replace("_", "/")
        for at in range(4):
            piece = std[at:][: len(std[at:]) - (len(std[at:]) % 4 == 1)]
            if KEY.encode() in base64.b64decode(piece + "=" * (-len(piece) % 4)):
                found.append(f"base64 {run}")
    for run in re.findall(r"[0-9A-Fa-f]{16,}", text):
        for at in range(2):
            piece = run[at:][: len(run[at:]) // 2 * 2]
            if KEY.encode() in binascii.unhexlify(piece):
                found.append(f"hex {run}")
    return found


async def _echoing(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    form, _, where = str(body["messages"][-1]["content"]).partition(":")
    key = request.headers["Authorization"][7:]
    if where == "midstream":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        delta = {"index": 0, "delta": {"role": "assistant", "content": "partial"}, "finish_reason": None}
        await resp.write(b"data: " + orjson.dumps({**CONTENT, "choices": [delta]}) + b"\n\n")
        await resp.write(b"data: " + _error_json(form, key, "server_error") + b"\n\n")
        await resp.write_eof()
        return resp
    error = _error_json(form, key, "invalid_request_error")
    return web.Response(body=error, status=int(where), content_type="application/json")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The structured (JSON) log lines edgeroute writes while the test runs."""
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.setup("json", "info", stream=out)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def _config(serve_routes: ServeRoutes, tmp_path: Path) -> dict[str, Any]:
    up = await serve_routes(web.post("/v1/chat/completions", _echoing))
    (tmp_path / "provider-key").write_text(KEY + "\n")
    return {
        "providers": {"p": {"base_url": up.url + "/v1", "api_key": f"file:{tmp_path / 'provider-key'}"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 1}}},
        "models": {"m": {"deployments": ["d"]}},
        "retry": {"base_ms": 1, "max_ms": 2},
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "gov.db"), "flush_interval": 0.05},
        "request_log": {"log_content": "full"},
    }


async def logged(s: aiohttp.ClientSession, url: str, request_id: str) -> str:
    """The request log's entry for `request_id`, as an admin reads it (JSON text)."""

    async def stored() -> str | None:
        status, body = await call(s, "GET", url + f"/admin/requests/{request_id}", ROOT)
        return orjson.dumps(body).decode() if status == 200 else None

    return await eventually(stored, "the request logged", within=10)


async def echoed_error(url: str, content: str, stream: bool) -> tuple[str, str]:
    """What a chat client sees of the upstream's error (its message and body) for `content`,
    and the request's id."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ROOT, max_retries=0)
    request_id = ""
    try:
        with pytest.raises(openai.APIError) as err:
            got = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": content}], stream=stream
            )
            request_id = got.response.headers["x-request-id"]  # type: ignore[union-attr]
            async for _ in got:  # type: ignore[union-attr]
                pass
    finally:
        await client.close()
    response = getattr(err.value, "response", None)
    seen = str(err.value) + (response.text if response is not None else "")
    return seen, response.headers["x-request-id"] if response is not None else request_id


@pytest.mark.parametrize("where", ["400", "500", "midstream"])
@pytest.mark.parametrize("form", [*FORMS, *ESCAPED])
async def test_an_upstream_echoing_the_key_encoded_gives_it_to_no_one(
    serve_routes: ServeRoutes, tmp_path: Path, json_logs: io.StringIO, form: str, where: str
) -> None:
    stream = where == "midstream"
    async with cost_proxy(await _config(serve_routes, tmp_path)) as proxy, aiohttp.ClientSession() as s:
        seen, request_id = await echoed_error(proxy.url, f"{form}:{where}", stream)
        logged_request = await logged(s, proxy.url, request_id)
    assert SAID in seen, seen  # the upstream's words reached the tenant, the key did not
    assert not exposes(seen), (FORMS[form](KEY), seen)
    assert not exposes(json_logs.getvalue()), json_logs.getvalue()
    assert not exposes(logged_request), (request_id, logged_request)


@pytest.mark.parametrize("form", list(FORMS))
def test_each_encoding_of_a_known_secret_is_redacted_where_it_stands(form: str) -> None:
    redact.register(KEY)
    echoed = FORMS[form](KEY)
    for text in (f"key {echoed} refused", f"key={echoed}.", f'"credentials":"{echoed}"', f"token{echoed}was"):
        assert not exposes(redact.outbound(text)), (text, redact.outbound(text))


async def _reflecting(request: web.Request) -> web.StreamResponse:
    """An upstream that sends the request's credentials back in its response headers."""
    await request.read()
    said = {"x-echo-authorization": request.headers["Authorization"], "www-authenticate": f'Bearer realm="{KEY}"'}
    said["x-api-key"] = base64.b64encode(f"user:{KEY}".encode()).decode()
    if request.query.get("fail"):
        return web.json_response(
            {"error": {"message": "no", "type": "invalid_request_error"}}, status=401, headers=said
        )
    answer = {
        **CONTENT,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
    return web.json_response(answer, headers=said)


@pytest.mark.parametrize("fail", [False, True])
async def test_an_upstream_reflecting_the_key_in_its_headers_hands_the_client_nothing(
    serve_routes: ServeRoutes, tmp_path: Path, fail: bool
) -> None:
    """No upstream response header is relayed: edgeroute writes its answers' headers itself."""
    cfg = await _config(serve_routes, tmp_path)
    up = await serve_routes(web.post("/v1/chat/completions", _reflecting))
    cfg["providers"]["p"]["base_url"] = up.url + "/v1"
    if fail:
        cfg["providers"]["p"]["options"] = {"chat_path": "/chat/completions?fail=1"}
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(
            proxy.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {ROOT}"}
        ) as r:
            said = "\n".join(f"{k}: {v}" for k, v in r.headers.items()) + await r.text()
            assert r.status == (502 if fail else 200) or (fail and r.status == 401), (r.status, said)
    assert not exposes(said), said
    assert "x-echo-authorization" not in said.lower() and "www-authenticate" not in said.lower(), said


@pytest.mark.parametrize("form", ["basic-ab", "hex", "upper"])
def test_an_encoded_key_split_over_two_reads_of_a_stream_is_redacted(form: str) -> None:
    """The relay redacts whole events (`RelayGuard`): an encoded key split at any byte is still found."""
    redact.register(KEY)
    echoed = FORMS[form](KEY).encode()
    event = b'data: {"error":{"message":"' + SAID.encode() + b": " + echoed + b'"}}\n\n'
    start = event.index(echoed)
    for at in range(start, start + len(echoed) + 1):
        guard = sse.RelayGuard()
        sent = guard.feed(event[:at]) + guard.feed(event[at:])
        assert SAID.encode() in sent and not exposes(sent.decode()), (at, sent)


def test_base64_that_holds_no_known_secret_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A base64 embeddings answer (the OpenAI SDK's default `encoding_format`), as the request log
    stores it, is redacted without decoding its runs: none holds a piece of a known secret's
    encoding. Decoding each run at its 4 alignments made it cost 5 times as much (red10 F4)."""
    redact.register(KEY)
    decoded: list[str] = []
    real = redact._decodings
    monkeypatch.setattr(redact, "_decodings", lambda run: decoded.append(run) or real(run))
    # Random bytes, as embeddings are: runs of consecutive bytes matched the pieces of another
    # test's secret of consecutive characters (`0123456789abcdef…`) when the suite ran whole.
    vectors = [base64.b64encode(random.Random(i).randbytes(6000)).decode() for i in range(8)]
    answer = orjson.dumps({"data": [{"embedding": v, "index": i} for i, v in enumerate(vectors)]}).decode()
    pairs, (pattern, repl, needles) = [], redact._SHAPES[0]  # the name=value pairs' pattern (`api-key=`)

    class Spy:
        def sub(self, r: str, t: str) -> str:
            pairs.append(t)
            return pattern.sub(r, t)

    monkeypatch.setattr(redact, "_SHAPES", [(Spy(), repl, needles), *redact._SHAPES[1:]])
    answer = answer.replace(vectors[0][:40], vectors[0][:36] + "qApi")  # `api` by chance, as in a third of them
    assert redact.text(answer) == answer
    assert decoded == [] and pairs == []  # that pattern's scan of it cost 40 ms
    echoed = f"{answer[:100]} key {FORMS['basic-ab'](KEY)} refused {answer[100:]}"
    assert not exposes(redact.text(echoed)) and len(decoded) == 1, decoded  # the run holding it alone
