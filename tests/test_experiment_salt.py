"""A keyed client's experiment arm stays put while the deployment's keys change.

Found by a red team (session 34, red8 S1): without `learning.experiment_salt` the salt that
buckets keyed requests was a hash of every config key's secret, so adding one unrelated key (or
rotating one) moved about half of the existing keys to the other arm mid-experiment. The salt
is now a random one the governance store (the ledger's database) makes once: every instance on
that store, and a restart, finds the same. The proxy is the real app, the upstreams the mock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.test_feedback_gaming import _ab, _arms

MANY = {f"k{n}": {"token": f"tok-{n}", "role": "service"} for n in range(24)}


async def _arms_of(start_proxy: Any, cfg: dict[str, Any], first: int = 0) -> list[str]:
    """The arm of each key `k<first>`..`k23` (by its token) on a new proxy for `cfg`."""
    proxy = await start_proxy(cfg)
    return [next(iter(await _arms(proxy.url, f"tok-{n}", range(1)))) for n in range(first, 24)]


async def test_adding_a_key_moves_no_existing_keys_arm(start_upstream, start_proxy, tmp_path: Path) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    ledger = {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}
    before = await _arms_of(start_proxy, _ab(strong, weak, keys=MANY, ledger=ledger))
    assert set(before) == {"weak", "strong"}, before  # a real split: the test can see a move
    # Another instance on the same store, whose config has one more key (a new hire's).
    more = MANY | {"newhire": {"token": "tok-newhire", "role": "service"}}
    assert await _arms_of(start_proxy, _ab(strong, weak, keys=more, ledger=ledger)) == before
    # One key's token rotated, and the server restarted on the same store: no arm moves.
    rotated = MANY | {"k0": {"token": "tok-0-rotated", "role": "service"}}
    assert await _arms_of(start_proxy, _ab(strong, weak, keys=rotated, ledger=ledger), first=1) == before[1:]
    # The salt is the store's own (random): another deployment's keys of the same names split otherwise.
    other = {"backend": "sqlite", "path": str(tmp_path / "other.db")}
    assert await _arms_of(start_proxy, _ab(strong, weak, keys=MANY, ledger=other)) != before


async def test_an_explicit_salt_still_wins_over_the_stores(start_upstream, start_proxy, tmp_path: Path) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    got = []
    for name in ("a.db", "b.db"):  # two stores, one configured salt: the same arms
        ledger = {"backend": "sqlite", "path": str(tmp_path / name)}
        cfg = _ab(strong, weak, keys=MANY, ledger=ledger, learning={"experiment_salt": "env-free-salt"})
        got.append(await _arms_of(start_proxy, cfg))
    assert got[0] == got[1]


async def test_a_keys_user_is_bucketed_with_the_salt(start_upstream, start_proxy, tmp_path: Path) -> None:
    """A key bound to a user was bucketed by that user's name alone (no salt), so anyone who
    knew the experiment's name and a user's could work out that user's arm offline, and every
    deployment split the same users alike. The user's name is now salted as a key id is: two
    stores split the same users otherwise, while two keys of one user still share its arm."""
    strong, weak = await start_upstream(), await start_upstream()
    users = {f"k{n}": {"token": f"tok-{n}", "role": "service", "user": f"person{n}"} for n in range(24)}
    got = []
    for name in ("a.db", "b.db"):
        ledger = {"backend": "sqlite", "path": str(tmp_path / name)}
        got.append(await _arms_of(start_proxy, _ab(strong, weak, keys=users, ledger=ledger)))
    assert set(got[0]) == {"weak", "strong"} and got[0] != got[1], got
    # A second key of person0's (a rotation by a new key, another app of theirs): person0's arm.
    both = users | {"again": {"token": "tok-again", "role": "service", "user": "person0"}}
    ledger = {"backend": "sqlite", "path": str(tmp_path / "a.db")}
    proxy = await start_proxy(_ab(strong, weak, keys=both, ledger=ledger))
    assert await _arms(proxy.url, "tok-again", range(1)) == {got[0][0]}
