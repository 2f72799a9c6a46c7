"""A rollback below admin cannot change who may call what.

`POST /admin/config/rollback` is an operator's route: an operator undoes a bad routing,
deployment or budget change. It applied a stored version whole, its `keys:` too, so an
admin's demotion of a key (admin to operator), its binding to a team or its removal (a key
by reference, whose `env:`/`file:` still resolves) was undone by the key's own holder: one
rollback to the version before made their key an admin again. Now a rollback whose version
differs from the running config in `keys`, `server.api_keys`, `server.metrics_public`,
`server.allowed_hosts`, `server.allowed_origins` or `governance.managed_keys` needs an admin
key (403 `permission_denied` naming the fields, nothing changed, audited as refused); a
rollback that leaves them alone is still an operator's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import eventually, simple_config
from tests.governance_support import Instance, call, write_config
from tests.security.governed import USER


async def test_an_operator_cannot_roll_back_a_demotion_of_its_own_key(start_upstream: Any, tmp_path: Path) -> None:
    bob_token = tmp_path / "bob-token"
    bob_token.write_text("tok-bob-0123456789\n")
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {
        "root": {"token": "tok-root-0123456789", "role": "admin"},
        "bob": {"token": f"file:{bob_token}", "role": "admin"},
    }
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    inst = Instance(path, tmp_path / "serve.log")
    try:
        inst.wait_ready()
        url, root, bob = inst.url, "tok-root-0123456789", "tok-bob-0123456789"
        status, _ = await call("GET", url + "/admin/keys", bob)
        assert status == 200  # an admin, in version 1
        # The admin demotes bob to operator (version 2), then adds a model (version 3).
        cfg["keys"]["bob"]["role"] = "operator"
        write_config(path, cfg)
        status, body = await call("POST", url + "/admin/reload", root)
        assert status == 200, body
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        status, body = await call("POST", url + "/admin/reload", root)
        assert status == 200, body
        status, body = await call("GET", url + "/admin/config", root)
        assert body["version"] == 3
        status, _ = await call("GET", url + "/admin/keys", bob)
        assert status == 403

        # Bob rolls back to the version where his key was an admin's: refused, nothing changed.
        status, body = await call("POST", url + "/admin/config/rollback", bob, json={"version": 1})
        assert status == 403, body
        assert body["error"]["code"] == "permission_denied" and "keys" in body["error"]["message"]
        status, body = await call("GET", url + "/admin/config", root)
        assert body["version"] == 3 and body["config"]["keys"]["bob"]["role"] == "operator"
        status, _ = await call("GET", url + "/admin/keys", bob)
        assert status == 403
        assert "m2" in path.read_text() and "role: operator" in path.read_text()
        status, body = await call("GET", url + "/admin/audit?action=config.rollback_refused", root)
        refused = body["entries"][0]
        assert refused["actor"] == "bob" and refused["after"]["changes"] == ["keys"]

        # A rollback that leaves access alone is still an operator's: version 2 drops m2.
        status, body = await call("POST", url + "/admin/config/rollback", bob, json={"version": 2})
        assert status == 200, body
        assert "m2" not in path.read_text()
        # An admin may roll back access: its choice.
        status, body = await call("POST", url + "/admin/config/rollback", root, json={"version": 1})
        assert status == 200, body
        status, _ = await call("GET", url + "/admin/keys", bob)
        assert status == 200
    finally:
        inst.stop()


async def test_the_rollback_guard_does_not_give_a_removed_key_back(start_upstream: Any, tmp_path: Path) -> None:
    """The guard rolls a reload back when errors rise in its window, which a client may cause
    (an upstream made to time out or fail). A reload that removed a leaked key, rolled back so,
    served the leaked key again. The guard does not undo an access change: it logs and audits
    that it could not, and an admin decides."""
    up = await start_upstream()
    leaked_file = tmp_path / "leaked-token"  # by reference: a literal token is never stored, so
    leaked_file.write_text("tok-leaked-0123456789\n")  # no rollback can bring it back once removed
    cfg = simple_config({"a": up})
    cfg["keys"] = {
        "root": {"token": "tok-root-0123456789", "role": "admin"},
        "leaked": {"token": f"file:{leaked_file}", "role": "admin"},
    }
    cfg["governance"] = {"rollback_guard": {"window_s": 30, "max_error_rate": 0.5, "min_requests": 3}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    inst = Instance(path, tmp_path / "serve.log")
    try:
        inst.wait_ready()
        url, root, leaked = inst.url, "tok-root-0123456789", "tok-leaked-0123456789"
        del cfg["keys"]["leaked"]
        write_config(path, cfg)
        status, body = await call("POST", url + "/admin/reload", root)
        assert status == 200, body
        assert (await call("GET", url + "/v1/models", leaked))[0] == 401
        up.options.fail_status = 500  # errors rise within the guard's window

        async def refused() -> bool:
            await call("POST", url + "/v1/chat/completions", root, json={"model": "m", "messages": USER})
            status, body = await call("GET", url + "/admin/audit?action=config.auto_rollback_refused", root)
            return status == 200 and bool(body["entries"])

        await eventually(refused, "the guard trying to roll back", within=20, every=0.2)
        assert (await call("GET", url + "/v1/models", leaked))[0] == 401
        status, body = await call("GET", url + "/admin/config", root)
        assert body["version"] == 2 and "leaked" not in body["config"]["keys"]
        assert "rollback guard: cannot roll back to version 1" in inst.log_path.read_text()
    finally:
        inst.stop()
