"""A provider key an upstream quotes encoded in ways redaction did not decode reaches no client:
MIME base64 (lines of 76 characters, as e-mail, PEM and Python's `base64.encodebytes` write
it) of the request it was sent, where the key's encoding straddles a line break and was in no
run whole; base64 of the key upper- or lower-cased; and a long message cut (at 500 characters)
inside a base64 blob holding the key, which kept the blob's head and the key's first bytes."""

from __future__ import annotations

import base64
import re
from typing import Any

import openai
from aiohttp import web

from edgeroute import redact
from tests.conftest import ServeRoutes
from tests.test_cost_support import cost_proxy

KEY = "Zq8v/wK3+mN7pR2xT9yB4cD6hJ"
PREFIX = "could not parse what you sent: "


def _request(key: str) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    )


def _said(case: str, key: str) -> str:
    if case.startswith("mime"):  # shifted so that the key's encoding straddles a line break
        return PREFIX + base64.encodebytes(b"x" * int(case[4:]) + _request(key)).decode().replace("\n", "\r\n")
    if case == "upper":
        return PREFIX + base64.b64encode(_request(key.upper())).decode()
    if case == "lower":
        return PREFIX + base64.b64encode(_request(key.lower())).decode()
    assert case == "cut"  # past 500 characters, the key's encoding across the cut
    return PREFIX + base64.b64encode(b"x" * 250 + _request(key) + b"y" * 300).decode() + " and more"


CASES = ["mime10", "mime20", "mime30", "upper", "lower", "cut"]


async def _upstream(request: web.Request) -> web.Response:
    case = (await request.json())["messages"][0]["content"]
    key = request.headers["Authorization"].removeprefix("Bearer ")
    return web.json_response({"error": {"message": _said(case, key), "type": "invalid_request_error"}}, status=400)


def _decoded(text: str) -> bytes:
    """Every run of base64 in `text` (its lines joined) decoded at each alignment."""
    joined = "".join(re.findall(r"[A-Za-z0-9+/]{8,}", text.replace("\\r\\n", "")))
    out = b""
    for at in range(4):
        chunk = joined[at:]
        out += base64.b64decode(chunk[: len(chunk) // 4 * 4] + "==", validate=False) + b"\0"
    return out


def _shows_the_key(text: str) -> bool:
    decoded = _decoded(text).lower()
    return any(KEY[i : i + 8].lower().encode() in decoded for i in range(len(KEY) - 7))


def test_the_test_sees_each_case() -> None:
    for case in CASES:
        assert _shows_the_key(_said(case, KEY)), case


async def test_encoded_keys_an_upstream_quotes_reach_no_client(serve_routes: ServeRoutes) -> None:
    up = await serve_routes(web.post("/v1/chat/completions", _upstream))
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": up.url + "/v1", "api_key": KEY}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1}}},
        "models": {"m": {"deployments": ["d"]}},
    }
    leaked = []
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        for case in CASES:
            try:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": case}])
            except openai.BadRequestError as e:
                message = e.body["message"] if isinstance(e.body, dict) else str(e.body)
                assert message.startswith(PREFIX), message  # the upstream's message, relayed
                if _shows_the_key(message):
                    leaked.append(f"{case}: {message!r}")
            else:
                raise AssertionError(f"{case}: the upstream's error was not relayed")
        await client.close()
    assert not leaked, "\n".join(leaked)


def test_a_cut_inside_a_blob_without_a_known_secret_keeps_its_head() -> None:
    blob = base64.b64encode(b"nothing secret here " * 40).decode()
    cut = redact.cut("said: " + blob, 500)
    assert cut.startswith("said: " + blob[:400]), cut
