"""Hot reload: a valid file is swapped in whole; an invalid one is refused and the old config keeps serving."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import yaml
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import simple_config


async def test_reload_swaps_config_and_keeps_health(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    path = tmp_path / "c.yaml"
    cfg = simple_config({"a": up})
    path.write_text(yaml.safe_dump(cfg))
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
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
