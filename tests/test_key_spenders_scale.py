"""Finding the keys that spend each managed key's budget takes time linear in the keys: the
parent -> children map is built once per change of the keys (it was rebuilt for every budget:
8,000 budgeted keys took 2.6 s, on the event loop when Redis was read back into). Real keys in
a real governance store (SQLite), the product's own functions."""

from __future__ import annotations

import time
from pathlib import Path

from edgeroute.governance import keys as K
from edgeroute.governance.store import GovStore


def _every_budgets_spenders(n: int, tmp: Path) -> float:
    """Seconds to find the spenders of every budget among `n` budgeted keys (as `_spenders`)."""
    store = GovStore("sqlite", str(tmp / f"gov-{n}.db"))
    for _ in range(n):
        K.create(store, K.KeyFields(budget_usd=1.0), "test")
    managed = K.ManagedKeys(store)
    managed.load()
    budgets = managed.budgets()
    assert len(budgets) == n
    best = float("inf")
    for _ in range(5):  # the quickest of five: a busy machine's pauses are not the code's
        started = time.perf_counter()
        for b in budgets:
            assert managed.spenders(b.match or "") == [b.match]
        best = min(best, time.perf_counter() - started)
    return best


def test_the_spenders_of_every_budget_take_time_linear_in_the_keys(tmp_path: Path) -> None:
    small, large = _every_budgets_spenders(1000, tmp_path), _every_budgets_spenders(4000, tmp_path)
    # Linear: x4 (x10 leaves room for cache effects and a busy machine); quadratic: x16.
    assert large < 10 * small, f"1,000 keys: {small:.3f} s, 4,000 keys: {large:.3f} s"
