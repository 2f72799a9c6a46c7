"""Hot reload: a valid file is swapped in whole; an invalid one is refused and the old config keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import yaml

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, simple_config


async def test_reload_swaps_config_and_keeps_health(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    path = tmp_path / "c.yaml"
    cfg = simple_config({"a": up})
    path.write_text(yaml.safe_dump(cfg))
    app = create_app(config_mod.load(path), str(path))
    server = ProxyTestServer(app)
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x")
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/admin/reload") as r:
                assert r.status == 200
                assert (await r.json())["models"] == ["m", "m2"]
            async with s.get(url + "/admin/deployments") as r:
                # The deployment did not change, so its health history carried over.
                assert (await r.json())["deployments"][0]["requests"] == 1
        assert [m.id for m in (await client.models.list()).data] == ["m", "m2"]

        path.write_text(yaml.safe_dump({**cfg, "models": {"m": {"deployments": ["missing"]}}}))
        async with aiohttp.ClientSession() as s, s.post(url + "/admin/reload") as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["code"] == "invalid_config"
            assert "models.m.deployments[0]: unknown deployment 'missing'" in str(err["problems"])
        # Rolled back: the old config still serves.
        r2 = await client.chat.completions.create(model="m2", messages=[{"role": "user", "content": "x"}])
        assert r2.choices[0].message.content
    finally:
        await client.close()
        await server.close()


async def _reload(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.post(url + "/admin/reload", headers=hdrs) as r:
        return r.status, await r.json()


async def test_reload_revokes_and_adds_keys(start_upstream, tmp_path: Path, monkeypatch) -> None:
    up = await start_upstream()
    monkeypatch.setenv("ER_TEST_SHARED_KEY", "shared-1")
    path = tmp_path / "c.yaml"
    cfg = simple_config(
        {"a": up},
        keys={
            "ops": {"token": "tok-ops", "role": "admin"},
            "app-1": {"token": "tok-app-1", "team": "web"},
        },
    )
    path.write_text(yaml.safe_dump(cfg))
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"

    async def ask(token: str) -> str:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
        try:
            r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            return "ok" if r.choices[0].message.content else "empty"
        except openai.AuthenticationError:
            return "401"
        finally:
            await client.close()

    try:
        assert (await ask("tok-app-1"), await ask("tok-app-2")) == ("ok", "401")
        del cfg["keys"]["app-1"]
        cfg["keys"]["app-2"] = {"token": "tok-app-2", "team": "web"}
        path.write_text(yaml.safe_dump(cfg))
        assert (await _reload(url, "tok-app-2"))[0] == 401  # not a key yet
        assert (await _reload(url, "tok-ops"))[0] == 200
        # The revoked key is refused at once; the new one works without a restart.
        assert (await ask("tok-app-1"), await ask("tok-app-2")) == ("401", "ok")
        # Switching to shared keys by reference is a restart-only change (virtual keys off).
        path.write_text(yaml.safe_dump({**cfg, "keys": {}, "server": {"api_keys": ["env:ER_TEST_SHARED_KEY"]}}))
        status, body = await _reload(url, "tok-ops")
        assert status == 400
        assert "turning cost control on or off takes effect on restart" in str(body["error"]["problems"])
        assert await ask("tok-app-2") == "ok"
    finally:
        await server.close()


async def test_reload_rotates_shared_keys_by_reference(start_upstream, tmp_path: Path, monkeypatch) -> None:
    up = await start_upstream()
    monkeypatch.setenv("ER_TEST_SHARED_KEY", "shared-1")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(simple_config({"a": up}, server={"api_keys": ["env:ER_TEST_SHARED_KEY"]})))
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/models", headers={"Authorization": "Bearer shared-1"}) as r:
                assert r.status == 200
            monkeypatch.setenv("ER_TEST_SHARED_KEY", "shared-2")
            assert (await _reload(url, "shared-1"))[0] == 200
            for token, want in (("shared-1", 401), ("shared-2", 200)):
                async with s.get(url + "/v1/models", headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == want, token
    finally:
        await server.close()


async def test_reload_refuses_restart_only_changes(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    path = tmp_path / "c.yaml"
    cfg = simple_config({"a": up})
    path.write_text(yaml.safe_dump(cfg))
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    try:
        budget = {"name": "all", "scope": "global", "limit_usd": 1.0}
        changed = {**cfg, "budgets": {"limits": [budget]}, "server": {"port": 9999}, "models": {}}
        changed["models"] = {"m": cfg["models"]["m"], "m3": {"deployments": ["d-a"]}}
        path.write_text(yaml.safe_dump(changed))
        status, body = await _reload(url)
        assert status == 400
        problems = [p["error"] for p in body["error"]["problems"]]
        assert any("budgets, rate_limits: turning cost control on" in p for p in problems)
        assert any("server.port: changed" in p for p in problems)
        # Nothing of the file was applied, not even the part a reload could have taken.
        async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["m"]
    finally:
        await server.close()


async def test_reload_lets_running_streams_finish_past_the_drain_timeout(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream(chunk_interval=0.1, reply_words=20)  # a ~2 s stream
    path = tmp_path / "c.yaml"
    cfg = simple_config({"a": up}, server={"drain_timeout": 0.2})
    path.write_text(yaml.safe_dump(cfg))
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        path.write_text(yaml.safe_dump(cfg))
        assert (await _reload(url))[0] == 200
        words = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert len("".join(words).split()) == 20  # whole, though the old pools were due to close at 0.2 s
    finally:
        await client.close()
        await server.close()


async def test_reload_of_a_config_not_from_a_file_says_so(start_upstream, start_proxy) -> None:
    proxy = await start_proxy(simple_config({"a": await start_upstream()}))  # built in memory, like the demo's
    status, body = await _reload(proxy.url)
    assert status == 400
    assert "not loaded from a file" in str(body["error"]["problems"])
