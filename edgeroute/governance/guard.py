"""The rollback guard: a config applied by reload (file, SIGHUP or API) is watched for a
window; if its answers' error rate or p95 latency passes the configured bound, the previous
version is rolled back to, with an ERROR log line and an audit entry (`config.auto_rollback`)
for alerting. A rollback itself is not watched (no flapping between two bad versions).

Only what the config decides is judged, never what a client chose: the latency is a stream's
time to its first token, or a whole answer's with at most `FEW_TOKENS` output tokens (a long
generation takes as long as the client asked); a client's own cancellation, slow reading or
`only-if-cached` miss is not counted at all. While several teams or keys send, the bad answers
must come from more than one of them. And the guard never undoes, by itself, a change that
tightened cost controls or took a deployment or provider away (`held_for_a_human`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

from edgeroute.governance.settings import RollbackGuard

log = logging.getLogger("edgeroute.governance")

_MAX_SAMPLES = 10_000
# Answers a client chose that say nothing of the config: an `only-if-cached` request's miss
# (504) is what the client asked for, so any client could roll back whatever an operator had
# just applied (a key's budget or rule, a model taken away) with min_requests of them.
# A client that hangs up or reads too slowly ends its own request: nothing of the config either.
NOT_THE_CONFIGS = frozenset({"cache_miss", "client_gone", "slow_client"})
# A whole answer's latency is judged only up to this many output tokens: past it, the time is
# the generation the client asked for (`max_tokens`), not the config's doing.
FEW_TOKENS = 32


@dataclass(slots=True)
class GenerationStats:
    """Answers of one config generation, as the request path records them (an append). Who
    sent each (its team, else its key) is kept as far as telling one sender from several."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    latency_senders: list[str] = field(default_factory=list)
    senders: set[str] = field(default_factory=set)  # at most 2: whether more than one sends
    failing: set[str] = field(default_factory=set)  # senders of 5xx answers, at most 2

    def observe(
        self,
        status: int,
        latency_ms: float,
        error_class: str | None = None,
        *,
        ttft_ms: float | None = None,
        output_tokens: int | None = None,
        sender: str = "",
    ) -> None:
        """One answer: `ttft_ms` set for a stream, `output_tokens` for a whole answer."""
        if error_class in NOT_THE_CONFIGS or status == 0:
            return
        self.requests += 1
        _add(self.senders, sender)
        if status >= 500:
            self.errors += 1
            _add(self.failing, sender)
        elif (sample := _config_latency(status, latency_ms, ttft_ms, output_tokens)) is not None:
            if len(self.latencies) < _MAX_SAMPLES:
                self.latencies.append(sample)
                self.latency_senders.append(sender)

    def p95(self) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(len(xs) * 0.95))] if xs else 0.0

    def from_several(self, bad: set[str]) -> bool:
        """Whether bad answers came from more than one sender, or only one sends at all: one
        team or key among others cannot roll back the config that holds them all."""
        return len(self.senders) < 2 or len(bad) >= 2

    def slow_senders(self, bound: float) -> set[str]:
        return {s for x, s in zip(self.latencies, self.latency_senders, strict=True) if x > bound}


def _add(few: set[str], sender: str) -> None:
    if len(few) < 2:
        few.add(sender)


def _config_latency(status: int, latency_ms: float, ttft_ms: float | None, output_tokens: int | None) -> float | None:
    """The part of an answer's latency the config controls, or None when the client chose it."""
    if status != 200:
        return None
    if ttft_ms is not None:
        return ttft_ms
    if output_tokens is not None and output_tokens <= FEW_TOKENS:
        return latency_ms
    return None


def verdict(stats: GenerationStats, guard: RollbackGuard) -> str | None:
    """Why the generation must go, or None."""
    if stats.requests < guard.min_requests:
        return None
    rate = stats.errors / stats.requests
    if guard.max_error_rate is not None and rate > guard.max_error_rate and stats.from_several(stats.failing):
        return f"error rate {rate:.0%} over {stats.requests} answers passed {guard.max_error_rate:.0%}"
    bound = guard.max_p95_ms
    if bound is not None and (p95 := stats.p95()) > bound and stats.from_several(stats.slow_senders(bound)):
        n = len(stats.latencies)
        return f"p95 latency {p95:.0f} ms (first token, or short answers) over {n} answers passed {bound:.0f} ms"
    return None


async def watch(stats: GenerationStats, guard: RollbackGuard, still_running: object) -> str | None:
    """Checks every half second until the window ends; returns the reason to roll back, if any.
    `still_running()` says whether the watched generation is still the live one."""
    loop = asyncio.get_running_loop()
    end = loop.time() + guard.window_s
    while loop.time() < end:
        await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))
        if not still_running():  # type: ignore[operator]
            return None
        if (why := verdict(stats, guard)) is not None:
            return why
    return None


# -- what only a human may undo ----------------------------------------------------------------

_LIMIT_FIELDS = ("rpm", "tpm", "max_parallel")


def held_for_a_human(running: str, target: str) -> list[str]:
    """How rolling back from `running` to `target` would loosen cost controls or bring back a
    deployment or provider, one line each (empty: the guard may). A client can make errors
    rise; a budget cut, a rate limit or a compromised upstream taken away must not be undone
    by them: the guard alerts and audits, an operator decides."""
    a, b = (_mapping(yaml.safe_load(t)) for t in (running, target))
    return _brought_back(a, b) + _looser_budgets(a, b) + _looser_limits(a, b)


def _mapping(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}


def _brought_back(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for section in ("deployments", "providers"):
        back = sorted(set(_mapping(b.get(section))) - set(_mapping(a.get(section))))
        out += [f"{section}.{name} brought back" for name in back]
    return out


def _budgets(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    limits = _mapping(data.get("budgets")).get("limits")
    items = limits if isinstance(limits, list) else []
    return {str(x.get("name")): x for x in items if isinstance(x, dict)}


def _looser_budgets(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """A budget of the running config gone or changed in the target, but for a lower limit."""
    old, new = _budgets(a), _budgets(b)
    out = []
    for name, x in old.items():
        y = new.get(name)
        if y is None:
            out.append(f"budget {name} removed")
            continue
        same_but_limit = {k: v for k, v in x.items() if k != "limit_usd"} == {
            k: v for k, v in y.items() if k != "limit_usd"
        }
        if not same_but_limit or not _at_most(y.get("limit_usd"), x.get("limit_usd")):
            out.append(f"budget {name} loosened")
    return out


def _limits(data: dict[str, Any]) -> dict[str, Any]:
    """Every rate limit of a config by where it is written."""
    rl = _mapping(data.get("rate_limits"))
    out: dict[str, Any] = {"rate_limits.per_key": rl.get("per_key")}
    for part in ("models", "deployments"):
        out |= {f"rate_limits.{part}.{k}": v for k, v in _mapping(rl.get(part)).items()}
    out |= {f"keys.{k}.limits": _mapping(v).get("limits") for k, v in _mapping(data.get("keys")).items()}
    return out


def _looser_limits(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    old, new = _limits(a), _limits(b)
    out = []
    for where, limit in old.items():
        for f in _LIMIT_FIELDS:
            held = _mapping(limit).get(f)
            if held is not None and not _at_most(_mapping(new.get(where)).get(f), held):
                out.append(f"{where}.{f} loosened")
    return out


def _at_most(value: Any, bound: Any) -> bool:
    """`value` is a number no greater than `bound` (an unset or odd one is not)."""
    numbers = (int, float)
    ok = isinstance(value, numbers) and isinstance(bound, numbers)
    return ok and not isinstance(value, bool) and value <= bound
