"""SSRF via body fields, and near-miss keys.

SSRF: advisories in this field include a client-supplied `api_base` that made a proxy send
its provider key elsewhere. Whatever a client puts in the body or the headers, edgeroute
sends to the configured URL with the configured credentials only.

Near-miss keys: a token one character off, a prefix, an extension, another case, or a
byte the HTTP parser refuses, is not a key (401, or 400 from the parser), on every path.
"""

from __future__ import annotations

import aiohttp
import openai
import pytest

from tests.conftest import routes_upstream
from tests.security.conftest import Leaky, leaky_config, raw_exchange

PROVIDER_KEY = "sk-provider-0123456789abcdefghij"
TOKEN = "vk-alice-0123456789ABCDEFghij"


async def test_ssrf_body_fields_never_change_the_destination_or_credentials(leaky: Leaky, start_proxy) -> None:
    """`api_base`/`base_url`/`extra_headers`/`api_key`… in the body, and credentials or hop
    headers from the client, never change where the proxy sends or what it authenticates with."""
    leaky.mode = "ok"
    decoy = Leaky(mode="ok")
    from aiohttp import web

    async with routes_upstream(web.post("/v1/chat/completions", decoy.handle)) as decoy.server:
        proxy = await start_proxy(leaky_config(leaky, api_key=PROVIDER_KEY))
        client = openai.AsyncOpenAI(
            base_url=proxy.url + "/v1",
            api_key="sk-client-chosen-0123456789",
            default_headers={"x-api-key": "client-x-key-012345", "api-key": "client-azure-012345", "Cookie": "a=b"},
        )
        await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={
                "api_base": decoy.base_url,
                "base_url": decoy.base_url,
                "api_key": "sk-client-body-0123456789",
                "extra_headers": {"Authorization": "Bearer sk-client-body-0123456789"},
                "headers": {"Host": "evil.example"},
                "deployment": "elsewhere",
                "url": decoy.base_url + "/chat/completions",
            },
        )
        await client.close()
    assert decoy.seen == []
    (sent,) = leaky.seen
    assert sent["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "x-api-key" not in {k.lower() for k in sent} and "Cookie" not in sent and "api-key" not in sent
    assert sent["Host"].startswith("127.0.0.1:")


def _keyed(up: Leaky) -> dict[str, object]:
    return leaky_config(up, keys={"alice": {"token": TOKEN}, "root": {"token": TOKEN + "-admin", "role": "admin"}})


NEAR_MISSES = [
    TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y"),  # one character changed
    TOKEN[:-1],  # a prefix
    TOKEN[:8],
    TOKEN + "x",  # an extension
    TOKEN.upper(),
    TOKEN.lower(),
    TOKEN.swapcase(),
    " " + TOKEN[1:],
    TOKEN.replace("-", "_"),
    "",
]


@pytest.mark.parametrize("token", NEAR_MISSES)
async def test_near_miss_keys_are_refused(leaky: Leaky, start_proxy, token: str) -> None:
    """Near-miss keys: 401 as Bearer and as x-api-key, on the API and on admin routes."""
    leaky.mode = "ok"
    proxy = await start_proxy(_keyed(leaky))
    async with aiohttp.ClientSession() as s:
        for hdrs in ({"Authorization": f"Bearer {token}"}, {"x-api-key": token}):
            async with s.post(
                proxy.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=hdrs
            ) as r:
                assert r.status == 401, (token, hdrs)
            async with s.get(proxy.url + "/admin/deployments", headers=hdrs) as r:
                assert r.status == 401
    assert leaky.seen == []


async def test_near_miss_keys_with_bytes_the_parser_refuses(leaky: Leaky, serve) -> None:
    """A trailing NUL or CR inside the token: the parser refuses the request (400), the token is not echoed."""
    proxy = await serve(_keyed(leaky))
    for tail in (b"\x00", b"\r", b"\x7f\x00"):
        head = (
            b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + tail
            + b"\r\n\r\n"
        )
        answer = await raw_exchange(proxy.port, head)
        assert answer.split(b" ", 2)[1] in (b"400", b"401"), answer
        assert TOKEN.encode() not in answer


async def test_the_right_key_passes_and_roles_hold(leaky: Leaky, start_proxy) -> None:
    """The exact token (scheme in any case, surrounding spaces stripped by HTTP) passes; a
    service key cannot reach admin routes."""
    leaky.mode = "ok"
    proxy = await start_proxy(_keyed(leaky))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        for hdrs in ({"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"bearer {TOKEN}"}, {"x-api-key": TOKEN}):
            async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=hdrs) as r:
                assert r.status == 200, hdrs
        async with s.post(proxy.url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 403
