"""Performance figures measured inside the test suite: reported, not asserted.

A shared CI machine's timings are not behaviour, so a test marked ``perf`` measures and
calls ``perf.report(name, value, unit, target)``; the figures, and whether each is within
its target, are printed at the end of the run (``pytest -m perf`` runs only these). The one
timing CI enforces is the latency gate, ``python -m edgeroute.bench.gate``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import pytest

_OPS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, ">": operator.gt}


@dataclass(slots=True, frozen=True)
class Figure:
    test: str
    name: str
    value: float
    unit: str
    target: str  # "< 100" or "> 5000", in `unit`

    @property
    def met(self) -> bool:
        op, _, bound = self.target.partition(" ")
        return _OPS[op](self.value, float(bound))


FIGURES: list[Figure] = []


_PROPERTY = "perf_figure"


class Perf:
    def __init__(self, node: pytest.Item) -> None:
        self._node = node

    def report(self, name: str, value: float, unit: str, target: str) -> None:
        """Records a figure; `target` is ``"< N"`` or ``"> N"`` in the same unit."""
        if target.partition(" ")[0] not in _OPS:
            raise ValueError(f"target {target!r} is not '< N' or '> N'")
        # On the test's report: under pytest-xdist it travels from the worker to the controller.
        self._node.user_properties.append((_PROPERTY, (self._node.nodeid, name, value, unit, target)))


@pytest.fixture
def perf(request: pytest.FixtureRequest) -> Perf:
    node = request.node
    if node.get_closest_marker("perf") is None:
        raise pytest.UsageError(f"{node.nodeid} uses the perf fixture without @pytest.mark.perf")
    assert isinstance(node, pytest.Item)
    return Perf(node)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        FIGURES.extend(Figure(*value) for key, value in report.user_properties if key == _PROPERTY)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("performance figures (reported, not asserted)")
    for f in FIGURES:
        verdict = "within target" if f.met else "OVER TARGET"
        terminalreporter.line(f"{f.name}: {f.value:,.1f} {f.unit} (target {f.target}) {verdict}  [{f.test}]")
