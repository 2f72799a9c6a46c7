"""Hostile parameters on the governance routes (managed keys, the audit log).

A NUL in a key id (`/admin/keys/{id}`, every method) or in an audit filter (`actor`,
`action`) reached PostgreSQL, which refuses NUL in text: a 500 and a traceback in the log
for each call (SQLite found nothing, a 404). Now both backends answer the 400 of a bad
parameter, naming it, as the request log does for its own filters.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import new_pg_schema_dsn, simple_config
from tests.security.governed import ROOT, USER
from tests.test_cost_support import cost_proxy


def _ledger(backend: str, tmp_path: Path) -> dict[str, Any]:
    if backend == "postgres":
        return {"backend": "postgres", "dsn": new_pg_schema_dsn(), "flush_interval": 0.05}
    return {"path": str(tmp_path / "gov.db")}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_nul_in_a_key_id_or_an_audit_filter_is_a_400_naming_it(
    start_upstream: Any, tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": _ledger(backend, tmp_path),
    }
    auth = {"Authorization": f"Bearer {ROOT}"}
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/keys", headers=auth, json={"name": "real"}) as r:
            assert r.status == 201
            real = (await r.json())["id"]
        calls = [
            (method, f"/admin/keys/{bad}{suffix}", "id")
            for bad in ("%00", real + "%00", "k" * 300)
            for method, suffix in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/rotate"))
        ]
        calls += [("GET", f"/admin/audit?{p}={v}", p) for p in ("actor", "action") for v in ("a%00b", "%00", "x" * 300)]
        for method, path, param in calls:
            async with s.request(method, proxy.url + path, headers=auth, json={}) as r:
                body = await r.json()
                assert r.status == 400, (method, path, r.status, body)
                assert body["error"]["code"] == "invalid_parameter" and body["error"]["param"] == param
        # The real key is untouched, and still found by its id and in the audit log by its action.
        async with s.get(proxy.url + f"/admin/keys/{real}", headers=auth) as r:
            assert r.status == 200 and (await r.json())["status"] == "active"
        async with s.get(proxy.url + "/admin/audit?action=key&actor=root", headers=auth) as r:
            entries = [e for e in (await r.json())["entries"] if e["target"] == real]  # the database may be shared
            assert r.status == 200 and [e["action"] for e in entries] == ["key.created"], entries
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]


async def test_a_keys_names_are_bounded(governed: Any) -> None:
    """A key is held in every instance's memory, and a tenant's admin key makes keys: its model
    names are at most 200 characters each, its denied tags and priority classes 100 (a body of
    10 MiB of one model name made a key of 10 MiB)."""
    auth = {"Authorization": f"Bearer {ROOT}"}
    async with aiohttp.ClientSession() as s:
        for field in ("models", "deny_tags", "priorities"):
            async with s.post(governed.url + "/admin/keys", headers=auth, json={field: ["x" * 201]}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["code"] == "invalid_key", body
                assert body["error"]["problems"][0]["field"] == f"{field}.0"
        async with s.post(governed.url + "/admin/keys", headers=auth, json={"deny_tags": ["t" * 100]}) as r:
            assert r.status == 201
        async with s.get(governed.url + "/admin/keys", headers=auth) as r:
            assert [len(k["deny_tags"][0]) for k in (await r.json())["keys"] if k.get("deny_tags")] == [100]
        # A model name of 200 characters passes the bound, and is then refused for naming no model.
        async with s.post(governed.url + "/admin/keys", headers=auth, json={"models": ["m" * 200]}) as r:
            body = await r.json()
            assert r.status == 400 and "no model" in body["error"]["message"], body


@pytest.mark.parametrize("fields", [{"budget_usd": 1e308}, {"budget_usd": 1e300}, {"expires_at": 1e308}])
async def test_a_budget_or_expiry_past_any_calendar_is_a_400(
    governed: Any, fields: dict[str, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A managed key with `budget_usd: 1e308` was made (201), and then every request it sent
    was a 500 with a traceback (its block limit, in nano-dollars, is infinite); one with
    `expires_at: 1e308` made `edgeroute keys list` end in a traceback for the operator (no
    date that far). Both are the 400 of a bad field now; a budget of a billion dollars passes."""
    auth = {"Authorization": f"Bearer {ROOT}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(governed.url + "/admin/keys", headers=auth, json=fields) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == "invalid_key", body
            assert body["error"]["problems"][0]["field"] == next(iter(fields)), body
        async with s.post(governed.url + "/admin/keys", headers=auth, json={"budget_usd": 1e9}) as r:
            assert r.status == 201
            token = (await r.json())["secret"]
    async with openai.AsyncOpenAI(base_url=governed.url + "/v1", api_key=token, max_retries=0) as client:
        answer = await client.chat.completions.create(model="m", messages=USER, max_tokens=5)
    assert answer.choices[0].message.content
    monkeypatch.setenv("EDGEROUTE_ADMIN_KEY", ROOT)
    monkeypatch.setenv("EDGEROUTE_URL", governed.url)
    done = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeroute", "keys", "list",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await done.communicate()
    assert done.returncode == 0, err.decode()


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("POST", "/admin/keys", "metadata"),
        ("PATCH", "/admin/keys/{id}", "metadata"),
        ("POST", "/admin/deployments", "price"),
        ("PATCH", "/admin/deployments/d-a", "price"),
    ],
)
async def test_an_admin_body_nested_past_the_bound_is_a_400(governed: Any, method: str, path: str, field: str) -> None:
    """An admin body nested deeper than any config or key holds was a 500 and a traceback: a
    key's `metadata` past 254 levels (JSON reads 1,024, writes 254) on `POST`/`PATCH
    /admin/keys` (a tenant's admin key's route too), a deployment's field past ~1,000 (the
    YAML the change is written as). It is a 400 now, as a request body nested more than 128
    levels deep is; a body within the bound is taken."""
    auth = {"Authorization": f"Bearer {ROOT}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=auth) as s:
        async with s.post(governed.url + "/admin/keys", data='{"name": "k"}') as r:
            made = await r.json()
        url = governed.url + path.format(id=made["id"])
        named = '"name": "n", "provider": "a", "model": "x", ' if path == "/admin/deployments" else ""
        for depth in (129, 300, 1000):
            deep = '{"a":' * depth + "1" + "}" * depth
            async with s.request(method, url, data="{" + named + f'"{field}": {deep}}}') as r:
                body = await r.json()
            assert r.status == 400, body
            assert body["error"]["message"] == "The body is nested more than 128 levels deep.", body
        if field == "metadata":
            async with s.request(method, url, json={"metadata": {"team": {"a": [1]}}}) as r:
                assert r.status in (200, 201) and (await r.json())["metadata"] == {"team": {"a": [1]}}


async def test_key_fields_of_the_wrong_type_or_naming_no_model_are_a_400(start_upstream: Any, tmp_path: Path) -> None:
    """`"rpm": true` made a key limited to 1 request a minute, `"budget_usd": "5"` five dollars,
    `"team": ""` a key confined to a team nobody is in, and `"models": ["nope"]` a key every
    request of which was refused: each was made without a word. Now each is a 400 naming the
    field, on create and on update, and nothing is made or changed."""
    cfg = simple_config({"a": await start_upstream()})
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": _ledger("sqlite", tmp_path),
    }
    auth = {"Authorization": f"Bearer {ROOT}"}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"rpm": True}, "rpm"),
        ({"tpm": 1.5}, "tpm"),
        ({"budget_usd": "5"}, "budget_usd"),
        ({"max_parallel": "2"}, "max_parallel"),
        ({"team": ""}, "team"),
        ({"user": ""}, "user"),
        ({"models": ["nope"]}, "models"),
        ({"models": ["m", "gpt-5-typo"]}, "models"),
    ]
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/keys", headers=auth, json={"name": "good", "models": ["m"]}) as r:
            assert r.status == 201, await r.text()
            good = await r.json()
        for body, field in bad:
            for method, path in (("POST", "/admin/keys"), ("PATCH", f"/admin/keys/{good['id']}")):
                async with s.request(method, proxy.url + path, headers=auth, json=body) as r:
                    answer = await r.json()
                    assert r.status == 400, (method, body, answer)
                    assert field in answer["error"]["message"] and answer["error"]["code"] == "invalid_key", answer
        async with s.get(proxy.url + "/admin/keys", headers=auth) as r:
            managed = [k for k in (await r.json())["keys"] if k.get("source") != "config"]
        assert [k["id"] for k in managed] == [good["id"]]  # nothing else was made...
        (now,) = managed
        assert now["models"] == ["m"] and now.get("rpm") is None and now.get("team") is None  # ...nor changed
        # Well-typed values still go through, an int for a dollar amount included.
        async with s.patch(
            proxy.url + f"/admin/keys/{good['id']}", headers=auth, json={"budget_usd": 5, "rpm": 30}
        ) as r:
            assert r.status == 200 and (await r.json())["rpm"] == 30
