"""Token-bucket rate limits (requests and tokens per minute), in process.

A bucket holds up to `capacity` and refills at `capacity` per minute; a request takes
1 from each requests bucket and its estimated tokens (prompt + max completion) from
each tokens bucket, all or nothing. A request that names no output bound takes its prompt
and one token per answer for sure, and as much more as each bucket holds up to what budgets
reserve for it (`Take.more`). Settlement puts back (or takes more of) the difference
between what was taken and the actual tokens, so a bucket may go into debt.
Headers follow OpenAI's `x-ratelimit-*` names.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace


@dataclass(slots=True)
class Bucket:
    capacity: float
    per_sec: float
    level: float
    stamp: float

    @classmethod
    def per_minute(cls, limit: int, now: float | None = None) -> Bucket:
        return cls(float(limit), limit / 60.0, float(limit), time.monotonic() if now is None else now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_sec)
            self.stamp = now

    def wait_for(self, n: float) -> float:
        """Seconds until `n` is available (0 if now); refill() first."""
        if self.level >= n:
            return 0.0
        if n > self.capacity:
            return math.inf
        return (n - self.level) / self.per_sec

    def reset_after(self) -> float:
        """Seconds until full again."""
        return max(0.0, (self.capacity - self.level) / self.per_sec)


@dataclass(slots=True, frozen=True)
class BucketState:
    """One bucket's view after a check: for headers and errors."""

    name: str  # e.g. "key:alice"
    kind: str  # "requests" | "tokens"
    limit: int
    remaining: int
    reset_s: float
    wait_s: float  # 0 when allowed
    taken: float = 0.0  # what the take took (its amount, and as much of its `more` as there was)


@dataclass(slots=True, frozen=True)
class Take:
    """A request's demand on one bucket."""

    name: str
    kind: str
    limit: int
    amount: float  # what must fit (else the take is refused)
    # Taken too as far as the bucket holds after `amount`: the output of a request that names no
    # bound, which the bucket would not otherwise see until the answer ends (ten such streams
    # passed a TPM of 2,000 by their output), nor refuse it outright when smaller than the bound.
    more: float = 0.0
    # Of `amount`, the output held for a request that names no bound (its floor at admission,
    # then all it took beyond its prompt and one token per answer: `held_takes`). Given back
    # when nothing was measured (an upstream error without usage kept it a minute).
    hold: float = 0.0


def unbounded_take(name: str, limit: int, tokens: float, more: float, answers: int = 1) -> Take:
    """A TPM take of a request naming no output bound: it must find its prompt (one token per
    answer) and a floor of its output hold, a quarter of the limit per answer at most, and takes
    up to `more` beyond. With a floor of one token a paced client was admitted on every few
    refilled tokens and wrote unbounded answers (~30x the TPM), `n` of them for one token each;
    a quarter (within what is left after the prompt) still serves a lone request when the
    bucket is full."""
    floor = max(0.0, min(more, float(limit // 4) * max(1, answers), limit - tokens))
    return Take(name, "tokens", limit, tokens + floor, more - floor, floor)


def take_of(t: Take, level: float) -> float:
    """What `t` takes from a bucket at `level` (at least `t.amount`): whole tokens of `more`."""
    return t.amount + max(0.0, min(t.more, math.floor(level - t.amount)))


def held_takes(takes: list[Take], states: list[BucketState]) -> list[Take]:
    """`takes` as they were taken (`BucketState.taken`), for settlement to give back the rest."""
    return [
        replace(t, amount=s.taken, more=0.0, hold=t.hold + s.taken - t.amount) if t.more or t.hold else t
        for t, s in zip(takes, states, strict=True)
    ]


def given_back(states: list[BucketState]) -> list[BucketState]:
    """`states` once their tokens were given back (a request refused after its take, by a
    budget or a deployment's limit): its headers tell the bucket as the next request finds it."""
    return [
        replace(
            s,
            remaining=min(s.limit, s.remaining + int(s.taken)),
            reset_s=max(0.0, s.reset_s - s.taken * 60 / s.limit),
            taken=0.0,
        )
        if s.kind == "tokens" and s.taken and s.limit
        else s
        for s in states
    ]


class LocalLimiter:
    """All buckets of this process; check-and-take is synchronous, hence atomic on the loop."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, t: Take, now: float) -> Bucket:
        b = self._buckets.get((t.name, t.kind))
        if b is None:
            b = self._buckets[(t.name, t.kind)] = Bucket.per_minute(t.limit, now)
        elif b.capacity != t.limit:
            # A reload changed the limit: what was used carries over, so a lowered limit
            # takes effect at once (the bucket may start in debt).
            b.refill(now)
            used = b.capacity - b.level
            b = self._buckets[(t.name, t.kind)] = Bucket.per_minute(t.limit, now)
            b.level = max(-b.capacity, b.capacity - used)
        else:
            b.refill(now)
        return b

    def seed(self, name: str, kind: str, limit: int, used: float, now: float | None = None) -> None:
        """Starts a bucket with `used` already taken (rebuilt from the ledger at start)."""
        b = Bucket.per_minute(limit, time.monotonic() if now is None else now)
        b.level = max(-b.capacity, b.capacity - used)
        self._buckets[(name, kind)] = b

    def usage(self, now: float | None = None) -> dict[tuple[str, str], tuple[int, float]]:
        """(name, kind) -> (limit, used now) for every bucket."""
        now = time.monotonic() if now is None else now
        out = {}
        for k, b in self._buckets.items():
            b.refill(now)
            out[k] = (int(b.capacity), b.capacity - b.level)
        return out

    def take(self, takes: list[Take], now: float | None = None) -> tuple[bool, list[BucketState]]:
        now = time.monotonic() if now is None else now
        buckets = [self._bucket(t, now) for t in takes]
        waits = [b.wait_for(t.amount) for b, t in zip(buckets, takes, strict=True)]
        ok = not any(waits)
        taken = [take_of(t, b.level) if ok else 0.0 for b, t in zip(buckets, takes, strict=True)]
        for b, n in zip(buckets, taken, strict=True):
            b.level -= n
        states = [
            BucketState(t.name, t.kind, t.limit, max(0, int(b.level)), b.reset_after(), w, n)
            for b, t, w, n in zip(buckets, takes, waits, taken, strict=True)
        ]
        return ok, states

    def __len__(self) -> int:
        return len(self._buckets)

    def forget_full(self, now: float | None = None) -> None:
        """Drops the buckets that have refilled (a new one starts full: nothing is lost), so
        buckets per client address cannot grow without bound."""
        now = time.monotonic() if now is None else now
        for k, b in list(self._buckets.items()):
            b.refill(now)
            if b.level >= b.capacity:
                del self._buckets[k]

    def adjust(self, name: str, kind: str, delta: float, now: float | None = None, limit: int = 0) -> None:
        """Takes `delta` more (or gives back when negative), without a check. A bucket dropped
        meanwhile (`forget_full`: it had refilled) is full: a give-back changes nothing, and a
        take of `limit`'s bucket starts it again in debt (the answer of a request longer than a
        minute was not counted)."""
        now = time.monotonic() if now is None else now
        b = self._buckets.get((name, kind))
        if b is None and delta > 0 and limit > 0:
            b = self._buckets[(name, kind)] = Bucket.per_minute(limit, now)
        if b is not None:
            b.refill(now)
            b.level = min(b.capacity, b.level - delta)


def duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "120ms"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    s = math.ceil(seconds)
    m, s = divmod(s, 60)
    return f"{m}m{s}s" if m else f"{s}s"


def headers_for(states: list[BucketState]) -> dict[str, str]:
    """`x-ratelimit-*` for the tightest bucket of each kind."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        mine = [s for s in states if s.kind == kind]
        if not mine:
            continue
        s = min(mine, key=lambda x: x.remaining / x.limit if x.limit else 0.0)
        out[f"x-ratelimit-limit-{kind}"] = str(s.limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(s.remaining)
        out[f"x-ratelimit-reset-{kind}"] = duration(s.reset_s)
    return out
