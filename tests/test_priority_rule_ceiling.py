"""A rule's `then.priority` is the operator's, but what triggers a rule may be the client's
(a tag, the prompt, the model named): such a rule must not lift a batch-only key into the
interactive class, where it takes freed slots first and the reserve kept for interactive
traffic. It is held at the highest class the key may use, and the explanation says so; a
rule that names its sender (teams, roles, users) still raises the class, and a set-up
without keys applies every rule's class as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.conftest import eventually
from tests.governance_support import call
from tests.test_governance_keys import ADMIN, _cfg, _proxy

RULES = [
    {
        "name": "web-now",
        "priority": 2,
        "when": {"teams": ["web"], "tags": ["now"]},
        "then": {"priority": "interactive"},
    },
    {"name": "urgent", "priority": 1, "when": {"tags": ["urgent", "now"]}, "then": {"priority": "interactive"}},
]


async def _served_class(url: str, token: str, tags: str) -> tuple[str | None, str, list[str]]:
    """(rule, class served in, the decision's reasons) of one request, read back from the request log."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-edgeroute-tags": tags}
    )
    await client.close()
    rid, rule = raw.headers["x-request-id"], raw.headers.get("x-edgeroute-rule")

    async def logged() -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": f"Bearer {ADMIN}"}
            async with s.get(f"{url}/admin/requests/{rid}", headers=headers) as r:
                return await r.json() if r.status == 200 else None

    detail = await eventually(logged, f"request {rid} in the request log")
    return rule, detail["priority"], detail["reasons"]


def _logged_cfg(up: Any, tmp_path: Path) -> dict[str, Any]:
    """Keys, the rules, and a ledger on disk (the request log lives beside it)."""
    return _cfg(up, rules=RULES, ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05}, request_log={})


async def test_a_tag_the_client_chooses_does_not_lift_a_batch_key_past_its_class(
    start_upstream: Any, tmp_path: Path
) -> None:
    cfg = _logged_cfg(await start_upstream(), tmp_path)
    async with _proxy(cfg) as url:
        _, batch = await call("POST", url + "/admin/keys", ADMIN, json={"priority": "batch"})
        _, mixed = await call("POST", url + "/admin/keys", ADMIN, json={"priority": "batch", "priorities": ["default"]})
        _, web = await call("POST", url + "/admin/keys", ADMIN, json={"priority": "batch", "team": "web"})

        rule, served, reasons = await _served_class(url, batch["secret"], "urgent")
        assert (rule, served) == ("urgent", "batch")
        assert any("priority interactive held at batch" in r for r in reasons), reasons
        # A key that may ask for `default` is lifted that far and no further.
        assert (await _served_class(url, mixed["secret"], "urgent"))[:2] == ("urgent", "default")
        # A rule naming the sender's team raises the class past the key's own.
        assert (await _served_class(url, web["secret"], "now"))[:2] == ("web-now", "interactive")
        # The same tag from a key of another team matches only the rule that names no sender.
        assert (await _served_class(url, batch["secret"], "now"))[:2] == ("urgent", "batch")
        # A key of no class of its own may use the default class: held there.
        _, plain = await call("POST", url + "/admin/keys", ADMIN, json={})
        assert (await _served_class(url, plain["secret"], "urgent"))[:2] == ("urgent", "default")
        # The operator's admin key (no class set) is held the same way.
        assert (await _served_class(url, ADMIN, "urgent"))[:2] == ("urgent", "default")


async def test_without_keys_every_rules_class_applies(start_upstream: Any, tmp_path: Path) -> None:
    cfg = _logged_cfg(await start_upstream(), tmp_path)
    del cfg["keys"], cfg["governance"]
    async with _proxy(cfg) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-edgeroute-tags": "urgent"}
        )
        await client.close()
        rid = raw.headers["x-request-id"]

        async def logged() -> dict[str, Any] | None:
            async with aiohttp.ClientSession() as s, s.get(f"{url}/admin/requests/{rid}") as r:
                return await r.json() if r.status == 200 else None

        detail = await eventually(logged, f"request {rid} in the request log")
        assert (raw.headers.get("x-edgeroute-rule"), detail["priority"]) == ("urgent", "interactive")
