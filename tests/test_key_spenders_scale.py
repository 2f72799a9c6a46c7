"""Finding the keys that spend each managed key's budget takes time linear in the keys: the
parent -> children map is built once per change of the keys (it was rebuilt for every budget:
8,000 budgeted keys took 2.6 s, on the event loop when Redis was read back into). Real keys in
a real governance store (SQLite), the product's own functions."""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType
from typing import Any

from edgeroute.governance import keys as K
from edgeroute.governance.store import GovStore


def _lines_to_find_every_budgets_spenders(n: int, tmp: Path) -> int:
    """Python lines run to find the spenders of every budget among `n` budgeted keys: a count
    of the work done, which a busy machine cannot change (a timing could)."""
    store = GovStore("sqlite", str(tmp / f"gov-{n}.db"))
    for _ in range(n):
        K.create(store, K.KeyFields(budget_usd=1.0), "test")
    managed = K.ManagedKeys(store)
    managed.load()
    budgets = managed.budgets()
    assert len(budgets) == n
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal lines
        lines += event == "line"
        return trace

    sys.settrace(trace)
    try:
        found = [managed.spenders(b.match or "") for b in budgets]
    finally:
        sys.settrace(None)
    assert found == [[b.match] for b in budgets]
    return lines


def test_the_spenders_of_every_budget_take_work_linear_in_the_keys(tmp_path: Path) -> None:
    small = _lines_to_find_every_budgets_spenders(300, tmp_path)
    large = _lines_to_find_every_budgets_spenders(1200, tmp_path)
    # Linear: x4; quadratic (the map rebuilt for every budget): x16.
    assert large < 6 * small, f"300 keys: {small} lines, 1,200 keys: {large} lines"
