"""Recent traffic in fixed time slots: what alerts and the deployments history read.

Each finished request adds to the current slot (a few counter increments and at most
two list appends per attempt); alert rules and the history sampler merge the slots of
the window they look at. Latency samples per slot and deployment are capped (a
uniform reservoir), so memory stays bounded at any request rate.

What the alerts judge is the deployment's doing, not a client's choice (the rollback guard's
rule, `governance.guard`): latency by a stream's time to first token or a whole answer's with
few output tokens (a long generation takes as long as its client asked), and attempts and
failures by sender (the team, else the key, as the circuit tells them apart), so that one
sender's failures can be set aside while the others are served well. The judged latencies
are also kept by sender (a small reservoir each, with how many it stands for), so that the
sender with most slow answers can be set aside when the others' answers are fast.
"""

from __future__ import annotations

import random
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeroute.accounting import RequestRecord
from edgeroute.cost.keys import ANONYMOUS
from edgeroute.governance.guard import config_latency

SLOT_S = 5.0
_SAMPLES = 256  # latency samples kept per slot and deployment
# Attempt outcomes that say nothing about the deployment's health.
_NEUTRAL = frozenset({"cancelled", "client_error"})
# Senders counted apart per slot and deployment; past it, the others' attempts are in the
# totals alone (never set aside: that errs towards alerting).
_SENDERS = 64
KEYLESS = ""  # the sender of requests without a key: the keyless clients are one
# Judged latencies kept per sender, slot and deployment (each weighs the answers it stands for):
# a flooding sender cannot crowd the others' samples out of the window, as it would of one
# shared reservoir; 64 senders at most, 2 x 32 doubles each.
_SENDER_SAMPLES = 32


@dataclass(slots=True)
class SenderTimes:
    """One sender's judged latencies in one slot: streams' first tokens and short answers."""

    ttfts_ms: array[float] = field(default_factory=lambda: array("d"))
    short_ms: array[float] = field(default_factory=lambda: array("d"))
    seen_ttft: int = 0
    seen_short: int = 0


@dataclass(slots=True)
class DeploymentStats:
    """A deployment's attempts in one slot, or merged over a window."""

    attempts: int = 0
    failures: int = 0
    # Of successful attempts (sampled). Unboxed doubles: an hour of slots holds up to 369k
    # samples per busy deployment, 8 bytes each here against 32 as a list of floats.
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    ttfts_ms: array[float] = field(default_factory=lambda: array("d"))
    # Of whole answers with few output tokens (or unknown), as streams' are in `ttfts_ms`.
    short_ms: array[float] = field(default_factory=lambda: array("d"))
    seen_latency: int = 0  # values offered to the reservoirs
    seen_ttft: int = 0
    seen_short: int = 0
    sent_by: dict[str, int] = field(default_factory=dict)  # attempts by sender (`sender_of`)
    failed_by: dict[str, int] = field(default_factory=dict)
    # Judged latencies by sender (of the senders `sent_by` counts), and how many of a sender
    # past those were judged (kept in the shared reservoirs alone).
    times_by: dict[str, SenderTimes] = field(default_factory=dict)
    untold_ttft: int = 0
    untold_short: int = 0

    @property
    def error_rate(self) -> float:
        return self.failures / self.attempts if self.attempts else 0.0

    def judged_ms(self) -> array[float]:
        """The latencies the deployment answers for: streams' first tokens, short answers."""
        return self.ttfts_ms + self.short_ms


@dataclass(slots=True)
class Slot:
    start: float
    requests: int = 0
    rate_limited: int = 0  # answered 429
    poison: int = 0
    cost_usd: float = 0.0
    shed: int = 0  # filled from the shed counter when the slot is read
    deployments: dict[str, DeploymentStats] = field(default_factory=dict)


def _keep(samples: array[float], seen: int, value: float, size: int = _SAMPLES) -> None:
    """Reservoir sampling: each of the `seen` values has the same chance to be kept."""
    if len(samples) < size:
        samples.append(value)
    else:
        j = int(random.random() * seen)  # randrange's checks cost more than the rest of `add`
        if j < size:
            samples[j] = value


class Window:
    """The last `keep_s` seconds of traffic, in `SLOT_S`-second slots."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self.slots: deque[Slot] = deque(maxlen=max(2, int(keep_s / SLOT_S) + 1))
        self._shed_seen = 0

    def _slot(self, now: float) -> Slot:
        start = now - now % SLOT_S
        if not self.slots or self.slots[-1].start < start:
            self.slots.append(Slot(start))
        return self.slots[-1]

    def add(self, rec: RequestRecord, now: float, mirror: bool = False) -> None:
        """`mirror`: a shadow mirror, whose spend and upstream calls count, not as a request."""
        sender = sender_of(rec.team, rec.key)
        # Whether an answer of this request is one the deployment answers for whole (the guard's
        # rule): few output tokens, or unknown (no usage): nothing says the client made it long.
        out = rec.usage.completion_tokens if rec.usage is not None else 0
        short = not rec.stream and config_latency(200, 0.0, None, out) is not None
        slots = self.slots  # `_slot`, its usual case inline (this runs once a request, on the loop)
        if not slots or (s := slots[-1]).start < now - now % SLOT_S:
            s = self._slot(now)
        s.cost_usd += rec.cost_usd
        if not mirror:
            s.requests += 1
            if rec.status == 429:
                s.rate_limited += 1
            if rec.error_class == "poison":
                s.poison += 1
        for a in rec.attempts:
            if a.outcome in _NEUTRAL:
                continue
            d = s.deployments.get(a.deployment)
            if d is None:
                d = s.deployments[a.deployment] = DeploymentStats()
            d.attempts += 1
            by = d.sent_by  # by sender, up to `_SENDERS` of them (past it, in the totals alone)
            if (n := by.get(sender)) is not None or len(by) < _SENDERS:
                by[sender] = (n or 0) + 1
                counted = True
            else:
                counted = False
            if a.outcome != "success":
                d.failures += 1
                if counted:
                    d.failed_by[sender] = d.failed_by.get(sender, 0) + 1
                continue
            d.seen_latency += 1
            kept = d.latencies_ms  # `_keep`, inline: every answered attempt comes here
            if len(kept) < _SAMPLES:
                kept.append(a.latency_ms)
            elif (j := int(random.random() * d.seen_latency)) < _SAMPLES:
                kept[j] = a.latency_ms
            if a.ttft_ms is not None:
                d.seen_ttft += 1
                _keep(d.ttfts_ms, d.seen_ttft, a.ttft_ms)
                _by_sender(d, sender if counted else None, a.ttft_ms, first_token=True)
            elif short:
                d.seen_short += 1
                _keep(d.short_ms, d.seen_short, a.latency_ms)
                _by_sender(d, sender if counted else None, a.latency_ms, first_token=False)

    def add_shed(self, shed_total: int, now: float) -> None:
        """Puts the requests shed since the last call into the current slot."""
        self._slot(now).shed += shed_total - self._shed_seen
        self._shed_seen = shed_total

    def since(self, t: float) -> list[Slot]:
        return [s for s in self.slots if s.start + SLOT_S > t]


def _by_sender(d: DeploymentStats, sender: str | None, ms: float, first_token: bool) -> None:
    """Keeps a judged latency in its sender's reservoir (None: a sender past those counted apart)."""
    if sender is None:
        if first_token:
            d.untold_ttft += 1
        else:
            d.untold_short += 1
        return
    t = d.times_by.get(sender)
    if t is None:
        t = d.times_by[sender] = SenderTimes()
    if first_token:
        t.seen_ttft += 1
        _keep(t.ttfts_ms, t.seen_ttft, ms, _SENDER_SAMPLES)
    else:
        t.seen_short += 1
        _keep(t.short_ms, t.seen_short, ms, _SENDER_SAMPLES)


@dataclass(slots=True)
class Weighted:
    """A sender's judged latencies over a window, each with the number of answers it stands for."""

    values: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def add(self, samples: array[float], seen: int) -> None:
        if samples:
            self.values += samples
            self.weights += [seen / len(samples)] * len(samples)

    @property
    def answers(self) -> float:
        return sum(self.weights)

    def over(self, bound: float) -> float:
        """About how many of its answers took longer than `bound`."""
        return sum(w for v, w in zip(self.values, self.weights, strict=True) if v > bound)


def judged_by_sender(slots: list[Slot], deployment: str, first_token_only: bool) -> dict[str, Weighted] | None:
    """A deployment's judged latencies over `slots` by sender (streams' first tokens, and short
    answers unless `first_token_only`); None when some were of senders past those counted apart
    (their answers cannot be told from the one set aside: nothing is)."""
    out: dict[str, Weighted] = {}
    for s in slots:
        d = s.deployments.get(deployment)
        if d is None:
            continue
        if d.untold_ttft or (d.untold_short and not first_token_only):
            return None
        for sender, t in d.times_by.items():
            w = out.get(sender)
            if w is None:
                w = out[sender] = Weighted()
            w.add(t.ttfts_ms, t.seen_ttft)
            if not first_token_only:
                w.add(t.short_ms, t.seen_short)
    return {k: v for k, v in out.items() if v.values}


def weighted_percentile(parts: list[Weighted], q: float) -> float | None:
    """The `q` quantile of several senders' weighted latencies, by nearest rank."""
    pairs = sorted((v, w) for p in parts for v, w in zip(p.values, p.weights, strict=True))
    total = sum(w for _, w in pairs)
    if not pairs:
        return None
    run = 0.0
    for v, w in pairs:
        run += w
        if run >= q * total - 1e-9:
            return v
    return pairs[-1][0]


def sender_of(team: str | None, key: str | None) -> str:
    """Who sent a request, as the circuit tells senders apart (`dispatch.senders`): its team,
    else its key, else the keyless clients as one. Never a value the client chooses."""
    if team:
        return f"team {team}"
    return f"key {key}" if key and key != ANONYMOUS.key else KEYLESS


def by_deployment(slots: list[Slot]) -> dict[str, DeploymentStats]:
    out: dict[str, DeploymentStats] = {}
    for s in slots:
        for name, d in s.deployments.items():
            st = out.get(name)
            if st is None:
                st = out[name] = DeploymentStats()
            st.attempts += d.attempts
            st.failures += d.failures
            st.latencies_ms += d.latencies_ms
            st.ttfts_ms += d.ttfts_ms
            st.short_ms += d.short_ms
            for sender, n in d.sent_by.items():
                st.sent_by[sender] = st.sent_by.get(sender, 0) + n
            for sender, n in d.failed_by.items():
                st.failed_by[sender] = st.failed_by.get(sender, 0) + n
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) by nearest rank; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]
