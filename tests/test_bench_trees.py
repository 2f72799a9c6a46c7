"""`bench compare --tree A --tree B`: each proxy runs its own tree's code, wherever the bench runs from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeroute.bench.stack import Stack


def _tree(root: Path, says: str) -> Path:
    """A source tree whose `python -m edgeroute` prints `says`."""
    pkg = root / "edgeroute"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(f"print({says!r})\n")
    return root


def test_a_tree_runs_its_own_code_from_inside_another_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bench run from a checkout (its `edgeroute` in the working directory), measuring another tree.
    monkeypatch.chdir(_tree(tmp_path / "checkout", "the checkout"))
    tree = _tree(tmp_path / "tree", "the tree")
    with Stack(pin=False) as stack:
        p = stack._spawn("tree0", [sys.executable, "-m", "edgeroute"], [], str(tree))
        out, _ = p.communicate(timeout=30)
    assert out.decode().strip() == "the tree"
