"""Runtime deployment changes over the API: each is a new config version, audited and reversible."""

from __future__ import annotations

from pathlib import Path

import openai
import yaml

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, simple_config
from tests.governance_support import call, write_config


async def _served(start_upstream, tmp_path: Path):  # type: ignore[no-untyped-def]
    a, b = await start_upstream(record=True), await start_upstream(record=True)
    cfg = simple_config({"a": a, "b": b})
    cfg["keys"] = {"root": {"token": "tok-admin", "role": "admin"}, "ops": {"token": "tok-ops", "role": "operator"}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    app = create_app(config_mod.load(path), str(path))
    server = ProxyTestServer(app)
    await server.start_server()
    return server, f"http://127.0.0.1:{server.port}", path, a, b


async def _served_by(url: str, n: int = 6) -> set[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="tok-admin", max_retries=0)
    try:
        out = set()
        for _ in range(n):
            r = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
            out.add(r.headers["x-edgeroute-deployment"])
        return out
    finally:
        await client.close()


async def test_drain_add_reweight_remove_and_roll_back(start_upstream, tmp_path: Path) -> None:
    server, url, path, _, b = await _served(start_upstream, tmp_path)
    try:
        assert await _served_by(url) == {"d-a", "d-b"}
        status, body = await call("POST", url + "/admin/deployments/d-b/drain", "tok-ops")
        assert status == 200 and body["version"] == 2 and body["file_updated"]
        assert await _served_by(url) == {"d-a"}
        status, deps = await call("GET", url + "/admin/deployments", "tok-ops")
        assert {d["name"]: d["drained"] for d in deps["deployments"]} == {"d-a": False, "d-b": True}
        # The last deployment in service cannot be drained.
        status, err = await call("POST", url + "/admin/deployments/d-a/drain", "tok-ops")
        assert status == 409 and err["error"]["code"] == "last_deployment"
        status, _ = await call("POST", url + "/admin/deployments/d-b/undrain", "tok-ops")
        assert status == 200 and await _served_by(url, 10) == {"d-a", "d-b"}

        # Adding and reweighting need an admin; an operator is refused.
        new = {"name": "d-c", "provider": "b", "model": "gpt-4o-mini", "weight": 5, "models": ["m"]}
        assert (await call("POST", url + "/admin/deployments", "tok-ops", json=new))[0] == 403
        status, body = await call("POST", url + "/admin/deployments", "tok-admin", json=new)
        assert status == 200, body
        assert "d-c" in yaml.safe_load(path.read_text())["models"]["m"]["deployments"]
        status, _ = await call("PATCH", url + "/admin/deployments/d-a", "tok-admin", json={"weight": 0})
        assert status == 200
        # Bad changes are refused whole.
        status, err = await call("PATCH", url + "/admin/deployments/d-a", "tok-admin", json={"provider": "x"})
        assert status == 400
        status, err = await call("PATCH", url + "/admin/deployments/d-a", "tok-admin", json={"weight": -1})
        assert status == 400 and err["error"]["code"] == "invalid_config"
        status, err = await call("POST", url + "/admin/deployments", "tok-admin", json={**new, "provider": "nope"})
        assert status == 409  # exists
        bad = {**new, "name": "d-d", "provider": "nope"}
        status, err = await call("POST", url + "/admin/deployments", "tok-admin", json=bad)
        assert status == 400 and "unknown provider 'nope'" in str(err["error"]["problems"])
        assert (await call("DELETE", url + "/admin/deployments/zzz", "tok-admin"))[0] == 404
        status, _ = await call("DELETE", url + "/admin/deployments/d-c", "tok-admin")
        assert status == 200

        status, audit = await call("GET", url + "/admin/audit?action=deployment", "tok-ops")
        assert [e["action"] for e in audit["entries"]] == [
            "deployment.removed", "deployment.updated", "deployment.added", "deployment.undrained",
            "deployment.drained",
        ]  # fmt: skip
        assert audit["entries"][1]["before"] == {"weight": 1} and audit["entries"][1]["after"] == {"weight": 0}
        # Every change was a version: roll back to the drained one.
        status, versions = await call("GET", url + "/admin/config/versions", "tok-ops")
        assert [v["source"] for v in versions["versions"]][:3] == ["api", "api", "api"]
        status, _ = await call("POST", url + "/admin/config/rollback", "tok-ops", json={"version": 2})
        assert status == 200
        b.options.requests.clear()
        assert await _served_by(url) == {"d-a"} and not b.options.requests
    finally:
        await server.close()


async def test_a_price_past_any_real_one_is_refused(start_upstream, tmp_path: Path) -> None:
    """An admin's PATCH of `price.input_per_mtok: 1e308` was taken (a new version), and every
    request on the route was then a 500: its cost, infinite in nano-dollars, could be neither
    reserved nor recorded. A price is at most a million USD a unit now; a high real one passes."""
    server, url, _, _, _ = await _served(start_upstream, tmp_path)
    try:
        for field in ("input_per_mtok", "output_per_mtok", "per_request"):
            status, err = await call(
                "PATCH", url + "/admin/deployments/d-a", "tok-admin", json={"price": {field: 1e308}}
            )
            assert status == 400 and err["error"]["code"] == "invalid_config", err
            assert field in str(err["error"]["problems"]), err
        status, _ = await call(
            "PATCH", url + "/admin/deployments/d-a", "tok-admin", json={"price": {"input_per_mtok": 150.0}}
        )
        assert status == 200
        assert await _served_by(url) == {"d-a", "d-b"}  # every request answered
    finally:
        await server.close()
