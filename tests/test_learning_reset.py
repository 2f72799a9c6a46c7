"""An admin can clear the feedback learner's evidence, fleet-wide (`POST /admin/learning/reset`).

Found by a red team (session 34, red8 L1): evidence never shrinks (a store refilled empty is
re-seeded by every running instance from what it holds), so evidence poisoned by a client (or
simply wrong) could not be cleared short of stopping every instance and deleting every state
file: a wipe of the shared store was refilled at the next sync of any running instance, and a
clean new instance adopted it. A reset now counts an epoch in the store; every instance that
sees it takes the store's sums as they are and drops its own, and its state file's.

Real Redis and the workers' SQLite file; the proxy is the real app, the clients plain HTTP and
the official SDK, the upstreams the bundled mock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from edgeroute.learning import FeedbackLearner
from edgeroute.learning_share import LearningShare
from tests import test_feedback_shared_once as once
from tests.test_feedback_per_team import RATINGS, _learning, _post, _proxy, _rate_weak_badly, _routes
from tests.test_feedback_shared_once import _joined

store = once.store  # the fixture: a Redis store and a workers' SQLite file
STRONG = ("translation", "strong")


async def _poison(
    learner: FeedbackLearner, share: LearningShare, prefix: str, n: int, task: str = "translation"
) -> None:
    for i in range(n):  # n scores of 0 on the strong route
        learner.served(f"{prefix}{i}", "strong", task, 0.0)
        learner.feedback(f"{prefix}{i}", 0.0)
    await share.flush()
    await share.sync()


async def test_a_reset_clears_every_instance_and_is_not_written_back(store: Any) -> None:
    make, _ = store
    a, share_a = _joined(make, 1)
    b, share_b = _joined(make, 2)
    await share_a.start()
    await share_b.start()
    await _poison(a, share_a, "p", 50)
    await share_b.sync()
    assert b.evidence[STRONG]["anonymous"] == (0.0, 50.0)
    b.served("late", "strong", "translation", 0.0)
    b.feedback("late", 0.0)  # scored on B before it has seen the reset: not counted after it

    assert await a.reset((None, None, None)) == 1  # the admin's reset, through instance A
    assert a.evidence == {}
    await share_b.flush()  # B's routine sync: before, it re-seeded the store with its 50
    await share_b.sync()
    assert b.evidence == {}
    await share_a.flush()
    await share_a.sync()
    fresh, share_f = _joined(make, 3)  # a clean instance joining after the reset
    await share_f.start()
    await share_f.sync()
    assert fresh.evidence == a.evidence == b.evidence == {}, (fresh.evidence, b.evidence)
    assert a.epoch == b.epoch == fresh.epoch == 1

    # Scores after the reset count as ever, everywhere.
    await _poison(b, share_b, "q", 2)
    await share_a.sync()
    assert a.evidence[STRONG]["anonymous"] == (0.0, 2.0)
    for s in (share_a, share_b, share_f):
        await s.store.close()


async def test_a_reset_of_one_task_keeps_the_rest(store: Any) -> None:
    make, _ = store
    a, share_a = _joined(make, 1)
    await share_a.start()
    await _poison(a, share_a, "t", 4)
    await _poison(a, share_a, "c", 3, task="code")
    b, share_b = _joined(make, 2)
    await share_b.start()
    await share_b.sync()
    await b.reset(("code", None, None))
    await share_a.sync()
    for learner in (a, b):
        assert learner.evidence == {STRONG: {"anonymous": (0.0, 4.0)}}, learner.evidence
    for s in (share_a, share_b):
        await s.store.close()


async def test_a_state_file_saved_before_a_reset_is_not_seeded_back(store: Any, tmp_path: Path) -> None:
    make, _ = store
    path = tmp_path / "learning.json"
    a = FeedbackLearner(path, seed=1)
    share_a = LearningShare(make(), a)
    a.share = share_a
    await share_a.start()
    await _poison(a, share_a, "p", 20)
    a.save()  # the file holds the poison
    other, share_o = _joined(make, 2)
    await share_o.start()
    await other.reset((None, None, None))  # reset through another instance while A is down
    await share_a.store.close()

    again = FeedbackLearner(path, seed=3)  # A restarts from its file
    assert again.evidence[STRONG]["anonymous"] == (0.0, 20.0)
    share_again = LearningShare(make(), again)
    again.share = share_again
    await share_again.start()
    await share_o.sync()
    assert again.evidence == other.evidence == {}
    again.save()
    assert json.loads(path.read_text())["evidence"] == []
    for s in (share_again, share_o):
        await s.store.close()


async def test_the_admin_reset_endpoint(start_upstream: Any, start_proxy: Any, tmp_path: Path) -> None:
    state = tmp_path / "learning.json"
    proxy = await _proxy(await start_upstream(), await start_upstream(), start_proxy, state_path=str(state))
    await _rate_weak_badly(proxy.url, "ops-svc")  # the operator's ratings move everyone off weak
    await _rate_weak_badly(proxy.url, "a-svc")
    assert await _routes(proxy.url, "b-svc") == {"strong"}

    headers = {"authorization": "Bearer ops-svc"}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/learning/reset", json={}, headers=headers) as r:
            assert r.status == 403, await r.text()  # an operator may not: admin only
    status, body = await _post(proxy.url, "/admin/learning/reset", "root-tok", {"team": "teamA"})
    assert status == 200 and body["tenant"] == "team:teamA" and body["entries"] == 1, body
    _, learned = await _learning(proxy.url, "root-tok")
    assert [(e["tenant"], e["b"]) for e in learned["evidence"]] == [("anonymous", float(RATINGS))]
    status, body = await _post(proxy.url, "/admin/learning/reset", "root-tok", {"task": 3})
    assert status == 400, body

    status, body = await _post(proxy.url, "/admin/learning/reset", "root-tok", {})  # all of it
    assert status == 200 and body["entries"] == 1 and body["epoch"] == 2, body
    _, learned = await _learning(proxy.url, "root-tok")
    assert learned["evidence"] == [] and learned["epoch"] == 2, learned
    assert await _routes(proxy.url, "b-svc") == {"weak"}  # routing is back to the router's own choice
    saved = json.loads(state.read_text())  # and a restart does not bring it back
    assert saved["evidence"] == [] and saved["epoch"] == 2
    async with aiohttp.ClientSession() as s:
        async with s.get(
            proxy.url + "/admin/audit?action=learning.reset", headers={"authorization": "Bearer root-tok"}
        ) as r:
            audit = await r.json()
    entries = audit["entries"] if isinstance(audit, dict) else audit
    assert [(e["actor"], e["after"]["tenant"]) for e in entries] == [("root", None), ("root", "team:teamA")], entries
