"""CSRF / DNS rebinding and auth bypass via Host or forwarding headers, on a keyless sidecar.

With no keys configured (the README's sidecar), anything that can reach 127.0.0.1 can
spend: a web page in the user's browser by a cross-site request (it carries `Origin`) or
by DNS rebinding (its own name as `Host`). Those are refused with 403; SDKs (no Origin,
a loopback Host) keep working; `/admin/*` answers loopback peers only, and no forwarding
header can make a remote peer look local."""

from __future__ import annotations

import socket

import aiohttp
import openai
import pytest

from tests.security.conftest import Leaky, leaky_config

BODY = {"model": "m", "messages": [{"role": "user", "content": "spend my money"}]}


def _local_non_loopback_ip() -> str | None:
    """This machine's address on a non-loopback interface (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


async def test_readme_sidecar_usage_still_works(leaky: Leaky, start_proxy) -> None:
    """The openai SDK sends no Origin and a loopback Host: served."""
    leaky.mode = "ok"
    proxy = await start_proxy(leaky_config(leaky))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused-on-a-sidecar")
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello!"}])
    await client.close()
    assert r.choices[0].message.content == "hi"


@pytest.mark.parametrize("ctype", ["application/json", "text/plain"])
async def test_csrf_a_web_page_cannot_spend_through_a_keyless_sidecar(leaky: Leaky, start_proxy, ctype: str) -> None:
    """CSRF: a cross-site POST (browsers add Origin) is refused before any upstream is called."""
    leaky.mode = "ok"
    proxy = await start_proxy(leaky_config(leaky))
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/route/explain", "/admin/reload"):
            hdrs = {"Origin": "http://evil.example", "Content-Type": ctype}
            async with s.post(proxy.url + path, json=BODY, headers=hdrs) as r:
                assert r.status == 403, (path, await r.text())
                err = (await r.json())["error"]
                assert err["type"] in ("permission_error",) or path == "/v1/messages"
        async with s.get(proxy.url + "/v1/models", headers={"Origin": "null"}) as r:
            assert r.status == 403  # a sandboxed iframe's Origin
    assert leaky.seen == []


async def test_dns_rebinding_a_foreign_host_is_refused(leaky: Leaky, start_proxy) -> None:
    """DNS rebinding: `Host: attacker.example` (resolved to 127.0.0.1) is refused; loopback names are served."""
    leaky.mode = "ok"
    proxy = await start_proxy(leaky_config(leaky))
    port = proxy.server.port
    async with aiohttp.ClientSession() as s:
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "localhost.attacker.example"):
            async with s.post(proxy.url + "/v1/chat/completions", json=BODY, headers={"Host": host}) as r:
                assert r.status == 403, host
                assert (await r.json())["error"]["code"] == "host_not_allowed"
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST."):
            async with s.post(proxy.url + "/v1/chat/completions", json=BODY, headers={"Host": host}) as r:
                assert r.status == 200, host
        # Probes send the pod's address: health stays reachable.
        async with s.get(proxy.url + "/healthz", headers={"Host": "10.1.2.3:8080"}) as r:
            assert r.status == 200
    assert len(leaky.seen) == 5


async def test_allow_lists_and_keys_lift_the_sidecar_checks(leaky: Leaky, start_proxy) -> None:
    """`server.allowed_hosts` / `allowed_origins` allow more; with keys configured, the key decides."""
    leaky.mode = "ok"
    proxy = await start_proxy(
        leaky_config(
            leaky, server={"allowed_hosts": ["edgeroute.internal"], "allowed_origins": ["https://app.example"]}
        )
    )
    async with aiohttp.ClientSession() as s:
        hdrs = {"Host": "edgeroute.internal:8080", "Origin": "https://app.example"}
        async with s.post(proxy.url + "/v1/chat/completions", json=BODY, headers=hdrs) as r:
            assert r.status == 200
        async with s.post(
            proxy.url + "/v1/chat/completions", json=BODY, headers={"Origin": "https://other.example"}
        ) as r:
            assert r.status == 403
    keyed = await start_proxy(leaky_config(leaky, server={"api_keys": ["shared-key-0123456789"]}))
    async with aiohttp.ClientSession() as s:
        hdrs = {
            "Origin": "https://app.example",
            "Host": "gateway.example",
            "Authorization": "Bearer shared-key-0123456789",
        }
        async with s.post(keyed.url + "/v1/chat/completions", json=BODY, headers=hdrs) as r:
            assert r.status == 200


async def test_auth_bypass_via_forwarding_headers_admin_is_loopback_only(leaky: Leaky, serve) -> None:
    """Auth bypass via forwarding headers: with no keys, `/admin/*` answers loopback peers only,
    and X-Forwarded-For / Forwarded / X-Real-IP claiming 127.0.0.1 change nothing."""
    ip = _local_non_loopback_ip()
    if ip is None:
        pytest.skip("no non-loopback interface to connect from")
    proxy = await serve(leaky_config(leaky, server={"allowed_hosts": [ip]}), host="0.0.0.0")
    spoof = {
        "X-Forwarded-For": "127.0.0.1",
        "Forwarded": "for=127.0.0.1",
        "X-Real-IP": "127.0.0.1",
        "Host": "localhost",
    }
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{ip}:{proxy.port}/admin/deployments", headers=spoof) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "admin_local_only"
        async with s.post(f"http://{ip}:{proxy.port}/admin/reload", headers=spoof) as r:
            assert r.status == 403
        async with s.get(f"http://127.0.0.1:{proxy.port}/admin/deployments") as r:
            assert r.status == 200


async def test_the_proxys_own_console_may_post_but_a_rebinding_page_may_not(leaky: Leaky, start_proxy) -> None:
    """The console at /ui posts with the proxy's own origin (browsers add it to same-origin POSTs):
    served. A rebinding page's origin is its own Host too, and that Host is refused."""
    proxy = await start_proxy(leaky_config(leaky))
    port = proxy.server.port
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/route/explain", json=BODY, headers={"Origin": proxy.url}) as r:
            assert r.status == 200, await r.text()
        for other in (f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}"):  # another port; another name
            async with s.post(proxy.url + "/v1/route/explain", json=BODY, headers={"Origin": other}) as r:
                assert r.status == 403, other
        hdrs = {"Origin": f"http://attacker.example:{port}", "Host": f"attacker.example:{port}"}
        async with s.post(proxy.url + "/v1/chat/completions", json=BODY, headers=hdrs) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "host_not_allowed"
    assert leaky.seen == []
