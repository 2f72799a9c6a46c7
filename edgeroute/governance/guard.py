"""The rollback guard: a config applied by reload (file, SIGHUP or API) is watched for a
window; if its answers' error rate or p95 latency passes the configured bound, the previous
version is rolled back to, with an ERROR log line and an audit entry (`config.auto_rollback`)
for alerting. A rollback itself is not watched (no flapping between two bad versions).

Only what the config decides is judged, never what a client chose: the latency is a stream's
time to its first token, or a whole answer's with at most `FEW_TOKENS` output tokens (a long
generation takes as long as the client asked); a client's own cancellation, slow reading or
`only-if-cached` miss is not counted at all; a stream is timed from its upstream attempt's
start (no capacity queue). The bound must still be passed once the answers of the sender
(team, else key) with most bad ones are set aside, with `min_requests` answers left: one team
or key cannot condemn the config that serves all (a window with one sender alone, a sidecar's
application, is judged whole: nobody else tells it from the config). A 404 for a model the reload took away, or
an upstream's 404, counts as an error (a renamed model); a client's own 4xx never does. And
the guard never undoes, by itself, a change that tightened cost controls or took a deployment
or provider out of service (`held_for_a_human`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from edgeroute.governance.settings import RollbackGuard

if TYPE_CHECKING:  # the record only: the guard is below the records in the layers
    from edgeroute.accounting import RequestRecord

log = logging.getLogger("edgeroute.governance")

_MAX_SAMPLES = 10_000
# Answers a client chose that say nothing of the config: an `only-if-cached` request's miss
# (504) is what the client asked for, so any client could roll back whatever an operator had
# just applied (a key's budget or rule, a model taken away) with min_requests of them.
# A client that hangs up or reads too slowly ends its own request, a drain that cuts one ends
# it for the server: nothing of the config either.
NOT_THE_CONFIGS = frozenset({"cache_miss", "client_gone", "slow_client", "server_shutdown"})
# A whole answer's latency is judged only up to this many output tokens: past it, the time is
# the generation the client asked for (`max_tokens`), not the config's doing.
FEW_TOKENS = 32


@dataclass(slots=True)
class GenerationStats:
    """Answers of one config generation, as the request path records them, by who sent each
    (its team, else its key): the verdict must hold without the sender with most bad answers.
    `gone_models` are the models the config before had and this one has not: a 404 for one
    is the reload's doing (a model renamed by a typo), not the client's."""

    gone_models: frozenset[str] = frozenset()
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    latency_senders: list[str] = field(default_factory=list)
    answers_by: dict[str, int] = field(default_factory=dict)
    errors_by: dict[str, int] = field(default_factory=dict)

    def answered(self, rec: RequestRecord) -> None:
        """One request's answer, timed as the config made it: a stream from its answering
        attempt's start (a capacity queue one client filled is not everyone's latency), a whole
        answer without its wait for capacity."""
        out = rec.usage.completion_tokens if rec.usage is not None and not rec.stream else None
        ttft = None
        if rec.stream:
            timed = [a.ttft_ms for a in rec.attempts if a.ttft_ms is not None]
            ttft = timed[-1] if timed else (rec.ttft_ms - rec.queue_ms if rec.ttft_ms is not None else None)
        sender = f"team:{rec.team}" if rec.team is not None else f"key:{rec.key}"
        if rec.team is None and rec.key is None:  # a gateway without keys cannot tell senders apart
            sender = f"request:{rec.request_id}"
        upstream_404 = any(a.status == 404 for a in rec.attempts)
        latency = rec.latency_ms - rec.queue_ms
        self.observe(rec.status, latency, rec.error_class, ttft_ms=ttft, output_tokens=out, sender=sender,
                     model=rec.model, upstream_404=upstream_404)  # fmt: skip

    def observe(
        self,
        status: int,
        latency_ms: float,
        error_class: str | None = None,
        *,
        ttft_ms: float | None = None,
        output_tokens: int | None = None,
        sender: str = "",
        model: str | None = None,
        upstream_404: bool = False,
    ) -> None:
        """One answer: `ttft_ms` set for a stream, `output_tokens` for a whole answer; `model`
        is the one asked for, `upstream_404` whether an upstream said it has no such model."""
        if error_class in NOT_THE_CONFIGS or status == 0:
            return
        self.requests += 1
        self.answers_by[sender] = self.answers_by.get(sender, 0) + 1
        if status >= 500 or (status == 404 and (upstream_404 or model in self.gone_models)):
            self.errors += 1
            self.errors_by[sender] = self.errors_by.get(sender, 0) + 1
        elif (sample := config_latency(status, latency_ms, ttft_ms, output_tokens)) is not None:
            if len(self.latencies) < _MAX_SAMPLES:
                self.latencies.append(sample)
                self.latency_senders.append(sender)

    def p95(self) -> float:
        return _p95(self.latencies)

    def error_rate_without_worst(self) -> tuple[float, int]:
        """The error rate once the answers of the sender with most errors are set aside, and
        how many answers are left: one team or key failing cannot condemn the config."""
        rate, left, _ = without_worst(self.requests, self.errors, self.answers_by, self.errors_by)
        return rate, left

    def p95_without_slowest(self, bound: float) -> tuple[float, int, int]:
        """The p95 once the answers of the sender with most answers over `bound` are set aside,
        how many are left, and how many of those are over `bound`."""
        if len(set(self.latency_senders)) < 2:  # one sender alone: all its answers are judged
            return _p95(self.latencies), len(self.latencies), sum(1 for x in self.latencies if x > bound)
        slow: dict[str, int] = {}
        for x, s in zip(self.latencies, self.latency_senders, strict=True):
            if x > bound:
                slow[s] = slow.get(s, 0) + 1
        worst = max(slow, key=slow.__getitem__, default=None)
        rest = [x for x, s in zip(self.latencies, self.latency_senders, strict=True) if s != worst]
        return _p95(rest), len(rest), sum(1 for x in rest if x > bound)


def without_worst(
    total: int, bad: int, total_by: Mapping[str, int], bad_by: Mapping[str, int]
) -> tuple[float, int, str | None]:
    """The rate of bad ones once the sender with most bad ones is set aside, how many are left,
    and that sender: None when none is (one sender alone, a sidecar's app: nobody tells it from
    the deployment or config; or none bad). The rollback guard's rule, and the alerts'."""
    worst = max(bad_by, key=bad_by.__getitem__, default=None) if len(total_by) >= 2 else None
    if worst is None:
        return (bad / total if total else 0.0), total, None
    left = total - total_by.get(worst, 0)
    return ((bad - bad_by[worst]) / left if left else 0.0), left, worst


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.95))] if xs else 0.0


def config_latency(status: int, latency_ms: float, ttft_ms: float | None, output_tokens: int | None) -> float | None:
    """The part of an answer's latency the config (or deployment) controls, or None when the
    client chose it: a stream's time to first token, a whole answer's with few output tokens."""
    if status != 200:
        return None
    if ttft_ms is not None:
        return ttft_ms
    if output_tokens is not None and output_tokens <= FEW_TOKENS:
        return latency_ms
    return None


def verdict(stats: GenerationStats, guard: RollbackGuard) -> str | None:
    """Why the generation must go, or None. Judged on the answers of all but the sender with
    most bad ones, and only with `min_requests` of them left (and more than one slow)."""
    if stats.requests < guard.min_requests:
        return None
    bound = guard.max_error_rate
    rate, left = stats.error_rate_without_worst()
    if bound is not None and left >= guard.min_requests and rate > bound:
        aside = " (the most failing sender's set aside)" if len(stats.answers_by) > 1 else ""
        return f"error rate {rate:.0%} over {left} answers{aside} passed {bound:.0%}"
    ms = guard.max_p95_ms
    if ms is not None and stats.p95() > ms:
        # Of a few answers the p95 is the slowest: one incidental slow answer is not several.
        p95, n, slow = stats.p95_without_slowest(ms)
        if n >= guard.min_requests and p95 > ms and slow >= 2:
            aside = " (the slowest sender's set aside)" if len(set(stats.latency_senders)) > 1 else ""
            what = f"p95 latency {p95:.0f} ms (first token, or short answers) over {n} answers"
            return f"{what}{aside} passed {ms:.0f} ms"
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
    """How rolling back from `running` to `target` would loosen cost controls or put a
    deployment or provider back in service, one line each (empty: the guard may). A client can make errors
    rise; a budget cut, a rate limit or a compromised upstream taken away must not be undone
    by them: the guard alerts and audits, an operator decides."""
    a, b = (_mapping(yaml.safe_load(t)) for t in (running, target))
    return _brought_back(a, b) + looser_budgets(a, b) + looser_limits(a, b)


def _mapping(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}


def _brought_back(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What rolling back from `a` to `b` puts back in service: a deployment or provider
    removed, a deployment undrained or its weight raised from 0, a deployment or fallback
    back in a model's lists (a rename excepted: its deployments serve under the new name)."""
    out = []
    for section in ("deployments", "providers"):
        back = sorted(set(_mapping(b.get(section))) - set(_mapping(a.get(section))))
        out += [f"{section}.{name} brought back" for name in back]
    now, then = _mapping(a.get("deployments")), _mapping(b.get("deployments"))
    for name in sorted(set(now) & set(then)):
        x, y = _mapping(now[name]), _mapping(then[name])
        if x.get("drained") is True and y.get("drained") is not True:
            out.append(f"deployments.{name} undrained")
        if x.get("weight", 1) == 0 and y.get("weight", 1) != 0:
            out.append(f"deployments.{name} weight raised from 0")
    return out + _back_in_models(_mapping(a.get("models")), _mapping(b.get("models")))


def _back_in_models(now: dict[str, Any], then: dict[str, Any]) -> list[str]:
    serving = {d for m in now.values() for d in _names(_mapping(m).get("deployments"))}
    out = []
    for model, spec in then.items():
        had = _mapping(now.get(model)) if model in now else None
        for part, names in _lists(_mapping(spec)).items():
            if had is None:  # a model the reload removed or renamed: only what no model serves
                back = [d for d in names if part == "deployments" and d not in serving]
            else:
                back = [n for n in names if n not in _lists(had).get(part, [])]
            out += [f"models.{model}.{part}: {n} brought back" for n in back]
    return out


def _lists(model: dict[str, Any]) -> dict[str, list[str]]:
    """A model's deployments and fallback models, by where they are written."""
    out = {p: _names(model.get(p)) for p in ("deployments", "fallbacks", "context_window_fallbacks")}
    out |= {f"fallbacks_on.{k}": _names(v) for k, v in _mapping(model.get("fallbacks_on")).items()}
    return out


def _names(value: Any) -> list[str]:
    return [str(x) for x in value] if isinstance(value, list) else []


def _budgets(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    limits = _mapping(data.get("budgets")).get("limits")
    items = limits if isinstance(limits, list) else []
    return {str(x.get("name")): x for x in items if isinstance(x, dict)}


def looser_budgets(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
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


def looser_limits(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """A rate limit of the running config removed or raised in the target."""
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
