"""An upstream echoing the provider key in forms the redaction layer still let through:

- next to another known secret that overlaps it (one's end is the other's start): the first
  match was replaced and the rest of the other, no longer whole, left in clear;
- base64 of it (a `Basic` header it quotes) in a message the upstream upper- or lower-cased
  whole (`AUTHORIZATION: BASIC DXNLCJP…`): no fixed piece of its encoding matched;
- base64 of base64 (a debug token or trace blob that holds the `Authorization` header);
- with zero-width characters between its characters (invisible, and the client's copy of the
  text gives the key back once they are dropped).

Each reached the tenant (a relayed error, a stream's error event), the JSON logs and the
request log.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import redact
from tests.conftest import ServeRoutes
from tests.security.governed import ROOT
from tests.security.test_secret_echo_encodings import KEY, _config, echoed_error, json_logs, logged
from tests.test_cost_support import cost_proxy

__all__ = ["json_logs"]  # the fixture, used by name

SAID = "Unsupported value in header, got"
# Two other known secrets (a second provider's keys) that overlap the key: one ends with its
# head, one starts with its tail. Glued to the key, the first match took the overlap.
BEFORE = "Pd7Lw2Qs9Xk4" + KEY[:8]
AFTER = KEY[-8:] + "Ws3Lk8Pd2Rx7"
SECRETS = (KEY, BEFORE, AFTER)
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


FORMS: dict[str, Callable[[str], str]] = {
    "overlap-after": lambda k: f"{SAID}: {k}{AFTER[8:]}",
    "overlap-before": lambda k: f"{SAID}: {BEFORE[:-8]}{k}",
    "basic-upper": lambda k: f"{SAID}: Authorization: Basic {_b64('user:' + k)}".upper(),
    "basic-lower": lambda k: f"{SAID}: Authorization: Basic {_b64('user:' + k)}".lower(),
    "base64-upper": lambda k: f"{SAID}: {_b64(k)}".upper(),
    "base64-twice": lambda k: f"{SAID}: {_b64(_b64(k))}",
    "basic-twice": lambda k: f"{SAID}: trace {_b64('Authorization: Basic ' + _b64('apikey:' + k))}",
    "zero-width": lambda k: f"{SAID}: {chr(0x200B).join(k)}",
    "zero-width-mixed": lambda k: f"{SAID}: " + "".join(c + INVISIBLE[i % 6] for i, c in enumerate(k)),
}


def _pieces(b: bytes) -> list[str]:
    """The base64 of `b` at its three alignments (whatever came before it), full groups only."""
    return [base64.b64encode(b[k:][: (len(b) - k) // 3 * 3]).decode() for k in range(3)]


def exposes(text: str) -> list[str]:
    """How `text` gives a secret (or 10 characters of one) away: as written in any case, with
    invisible characters dropped (raw or as a log line's escapes), or inside base64 (once or twice, in any case)."""
    low = re.sub(rf"[{INVISIBLE}]|\\+(?:xad|u(?:200[b-d]|2060|feff))", "", text, flags=re.I).lower()
    found = [f"{s} [{i}:]" for s in SECRETS for i in range(len(s) - 9) if s[i : i + 10].lower() in low]
    for piece in _pieces(KEY.encode()):
        found += [f"base64 {piece}"] if piece.lower()[:16] in low else []
        found += [f"base64 twice {p}" for p in _pieces(piece.encode()) if p.lower()[:16] in low]
    return found


def _error_json(form: str, key: str, etype: str) -> bytes:
    return orjson.dumps({"error": {"message": FORMS[form](key), "type": etype}})


async def _echoing(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    form, _, where = str(body["messages"][-1]["content"]).partition(":")
    key = request.headers.get("x-api-key") or request.headers["Authorization"][7:]
    if where == "midstream":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x"}
        delta = {"index": 0, "delta": {"role": "assistant", "content": "partial"}, "finish_reason": None}
        await resp.write(b"data: " + orjson.dumps({**chunk, "choices": [delta]}) + b"\n\n")
        await resp.write(b"data: " + _error_json(form, key, "server_error") + b"\n\n")
        await resp.write_eof()
        return resp
    return web.Response(body=_error_json(form, key, "invalid_request_error"), status=int(where))


async def _proxy_config(serve_routes: ServeRoutes, tmp_path: Path) -> dict[str, object]:
    cfg = await _config(serve_routes, tmp_path)
    up = await serve_routes(web.post("/v1/chat/completions", _echoing))
    cfg["providers"]["p"]["base_url"] = up.url + "/v1"  # type: ignore[index]
    for name, other in (("q", BEFORE), ("r", AFTER)):  # other providers' keys: known secrets
        (tmp_path / f"{name}-key").write_text(other + "\n")
        cfg["providers"][name] = {"base_url": up.url + "/v1", "api_key": f"file:{tmp_path / f'{name}-key'}"}  # type: ignore[index]
    return cfg


@pytest.mark.parametrize("where", ["400", "500", "midstream"])
@pytest.mark.parametrize("form", list(FORMS))
async def test_an_upstream_echoing_the_key_gives_no_piece_of_it_to_anyone(
    serve_routes: ServeRoutes, tmp_path: Path, json_logs: io.StringIO, form: str, where: str
) -> None:
    stream = where == "midstream"
    async with cost_proxy(await _proxy_config(serve_routes, tmp_path)) as proxy, aiohttp.ClientSession() as s:
        seen, request_id = await echoed_error(proxy.url, f"{form}:{where}", stream)
        logged_request = await logged(s, proxy.url, request_id)
    assert SAID.lower() in seen.lower(), seen  # the upstream's words reached the tenant, the key did not
    assert not exposes(seen), (FORMS[form](KEY), seen)
    assert not exposes(json_logs.getvalue()), json_logs.getvalue()
    assert not exposes(logged_request), (request_id, logged_request)


@pytest.mark.parametrize("form", ["overlap-before", "base64-upper", "basic-twice", "zero-width"])
async def test_through_the_messages_api_the_anthropic_sdk_sees_no_piece_of_the_key(
    serve_routes: ServeRoutes, tmp_path: Path, form: str
) -> None:
    async with cost_proxy(await _proxy_config(serve_routes, tmp_path)) as proxy:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ROOT, max_retries=0)
        try:
            with pytest.raises(anthropic.APIStatusError) as err:
                await client.messages.create(
                    model="m", max_tokens=16, messages=[{"role": "user", "content": f"{form}:400"}]
                )
        finally:
            await client.close()
    seen = str(err.value) + err.value.response.text
    assert SAID.lower() in seen.lower() and not exposes(seen), seen


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_is_redacted_where_it_stands(form: str) -> None:
    for secret in SECRETS:
        redact.register(secret)
    echoed = FORMS[form](KEY)
    for text in (echoed, orjson.dumps({"error": {"message": echoed}}).decode(), f"token{echoed}was"):
        assert not exposes(redact.outbound(text)), (text, redact.outbound(text))
        assert not exposes(redact.text(text)), (text, redact.text(text))


def test_secrets_overlapping_each_other_go_as_one_span() -> None:
    for secret in SECRETS:
        redact.register(secret)
    assert redact.text(f"a {BEFORE[:-8]}{KEY}{AFTER[8:]} b") == f"a {redact.MARKER} b"
    assert redact.text(f"a {KEY} b {AFTER} c") == f"a {redact.MARKER} b {redact.MARKER} c"  # apart: each its own


def test_overlapping_secrets_go_as_one_span_while_the_patterns_build() -> None:
    """The forms a change adds (the gap, plain strings) and the built patterns' overlap too."""
    text = f"a {BEFORE[:-8]}{KEY}{AFTER[8:]} b"
    for built, added in (([KEY], [BEFORE, AFTER]), ([BEFORE, AFTER], [KEY])):
        assert redact._sub_all(text, redact._Gap(added, True), redact._Matchers(built, True)) == f"a {redact.MARKER} b"


def test_a_word_secret_glued_to_another_is_replaced_beside_its_marker() -> None:
    """Words (short secrets) are whole tokens: looked for once the others are replaced."""
    redact.register("hunter22")
    redact.register(KEY)
    assert redact.text(f"x {KEY}hunter22 y") == f"x {redact.MARKER}{redact.MARKER} y"


async def _chunked(request: web.Request) -> web.StreamResponse:
    """An error body written in two chunks, the key split between them (read whole before it is
    relayed: no half of it is redacted alone)."""
    await request.read()
    key = request.headers["Authorization"][7:]
    error = {"message": f"{FORMS['base64-twice'](key)} and {key}", "type": "invalid_request_error"}
    body = orjson.dumps({"error": error})
    at = body.index(key.encode()) + len(key) // 2
    resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(body[:at])
    await resp.write(body[at:])
    await resp.write_eof()
    return resp


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_body_in_two_chunks_gives_no_piece_of_the_key(
    serve_routes: ServeRoutes, tmp_path: Path, stream: bool
) -> None:
    cfg = await _proxy_config(serve_routes, tmp_path)
    up = await serve_routes(web.post("/v1/chat/completions", _chunked))
    cfg["providers"]["p"]["base_url"] = up.url + "/v1"  # type: ignore[index]
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ROOT, max_retries=0)
        try:
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=stream
                )
        finally:
            await client.close()
    seen = str(err.value) + err.value.response.text
    assert SAID in seen and not exposes(seen), seen


def test_invisible_characters_that_hide_no_secret_are_kept_as_written() -> None:
    """An emoji's joiner, a zero-width space after a word: kept; only those between a key's
    characters go, and only from a text that holds a secret once they are gone."""
    redact.register(KEY)
    said = "she 👩\u200d💻 wrote\u200b a line, soft\u00adhyphen"
    assert redact.text(said) == said and redact.outbound(said) == said
    hidden = said + " " + "\u200b".join(KEY)
    assert redact.text(hidden) == "she 👩\u200d💻 wrote\u200b a line, softhyphen " + redact.MARKER
