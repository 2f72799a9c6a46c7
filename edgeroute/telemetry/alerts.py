"""In-process alerts: rules over the recent traffic window, evaluated every few seconds.

Each rule measures one value per subject (a deployment, a budget, or the proxy as a
whole) over its window and fires when the value goes above its threshold; it resolves
when the value is back at or below it. A rate or percentile with fewer than
`min_requests` samples in the window changes nothing (an open circuit sends no
traffic, and silence is not recovery). Deduplication: an alert notifies once when it
fires and once when it resolves, not at every evaluation; cooldown: an alert that fires
again within `cooldown_s` of its last notification is shown but not notified again
(nor is its resolution). Under `serve --workers N` every worker evaluates (its
`GET /admin/alerts`); budgets, circuits and secrets are the same in every worker (shared
store, shared ejections, the same files), so worker 0 alone notifies those, which each worker
sent before; the traffic kinds measure each worker's own window and notify from each.

Across instances that share Redis (`shared_state`), the shared kinds are claimed there before
they are notified (`alert_claims`): one message per transition whichever instances see it,
and the cooldown is shared. The traffic kinds stay per instance, named in their message
(`on HOST:PID`): each instance routes on its own view of a deployment, a p95 cannot be
merged from several, and a failure that one instance alone sees (its network path) is one
to hear about, not to average away.

A deployment's rules judge what the deployment does, not what one client chose (the rollback
guard's rule, `governance.guard`): `latency_p95` is over streams' times to first token and
whole answers of at most `FEW_TOKENS` output tokens (a long generation takes as long as its
client asked); `error_rate` sets aside the sender (team, else key) with most failures when the
other senders' attempts are enough (`min_requests`) and fail at most at the threshold, and says
so in the message; `latency_p95` and `ttft_p95` likewise set aside the sender with most answers
over the threshold when the others' answers are enough and their p95 is within it (a team whose
long prompts or own requests are slow). Positive evidence only, as the circuit: with one sender,
or when the others fail or are slow too, the whole rate or p95 is judged. A firing alert's
message is rebuilt with its value.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from edgeroute import redact, secrets
from edgeroute.config import Budget
from edgeroute.governance.guard import FEW_TOKENS, without_worst
from edgeroute.state import Live
from edgeroute.telemetry.alert_claims import INSTANCE, AlertClaims, Transition
from edgeroute.telemetry.notify import Notification, Notifier
from edgeroute.telemetry.settings import AlertRule, Alerts
from edgeroute.telemetry.window import (
    KEYLESS,
    DeploymentStats,
    Slot,
    Window,
    by_deployment,
    judged_by_sender,
    percentile,
    weighted_percentile,
)

RECENT = 200  # resolved alerts kept for `GET /admin/alerts`
_ids = itertools.count(1)
_PREFIX = os.urandom(3).hex()
# What a rule measured of one subject: the value (None: too few samples, changes nothing) and a
# note for its message (what was set aside).
Measure = tuple[str, float | None, str]


@dataclass(slots=True)
class Alert:
    id: str
    rule: str
    kind: str
    subject: str
    severity: str
    state: str  # firing | resolved
    value: float
    threshold: float
    started_at: float
    resolved_at: float | None
    message: str
    instance: str  # the process that raised it (HOST:PID)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _message(rule: AlertRule, subject: str, value: float, state: str, named: bool = False, note: str = "") -> str:
    what = {
        "error_rate": f"error rate {value:.1%} (threshold {rule.threshold:.1%})",
        "latency_p95": (
            f"p95 latency {value:.0f} ms (first token, or answers of at most {FEW_TOKENS} tokens;"
            f" threshold {rule.threshold:.0f} ms)"
        ),
        "ttft_p95": f"p95 time to first token {value:.0f} ms (threshold {rule.threshold:.0f} ms)",
        "circuit_open": "circuit open" if state == "firing" else "circuit closed",
        "budget_percent": f"{value:.1f}% spent (threshold {rule.threshold:g}%)",
        "spend_per_hour": f"spending {value:.2f} USD/h (threshold {rule.threshold:g})",
        "shed_rate": f"{value:.1%} of requests shed at capacity (threshold {rule.threshold:.1%})",
        "rate_limited_rate": f"{value:.1%} of requests answered 429 (threshold {rule.threshold:.1%})",
        "poison_requests": f"{value:.0f} poison requests (threshold {rule.threshold:g})",
        "secret_refresh_failed": (
            "cannot be read again; the last good value is in use" if state == "firing" else "read again"
        ),
    }[rule.kind]
    window = f" over {rule.window_s:g} s" if rule.kind not in _STATE_KINDS | {"budget_percent"} else ""
    tail = "" if state == "firing" else " — resolved"
    where = f" on {INSTANCE}" if named and rule.kind not in _SHARED_KINDS else ""
    aside = f" ({note})" if note else ""
    return f"{rule.name}: {subject}{where}: {what}{window}{aside}{tail}"


def _error_rate(rule: AlertRule, st: DeploymentStats | None) -> tuple[float | None, str]:
    """A deployment's error rate, without its most failing sender when the others are enough
    and served well (then the note says whose attempts were set aside), else the whole rate."""
    if st is None or st.attempts < rule.min_requests:
        return None, ""
    rate, left, worst = without_worst(st.attempts, st.failures, st.sent_by, st.failed_by)
    if worst is None or left < rule.min_requests or rate > rule.threshold:
        return st.error_rate, ""
    # Alerts are read by global keys only (a team's key gets a 403) and sent to the operators'
    # webhooks: naming the team, as the circuit's log line does, tells no tenant of another.
    who = redact.text(worst) if worst != KEYLESS else "the keyless clients"
    failed, sent = st.failed_by[worst], st.sent_by[worst]
    return rate, f"{who}: {failed} failed of {sent} attempts set aside, the others served well"


def _latency(rule: AlertRule, st: DeploymentStats | None, slots: list[Slot], name: str) -> tuple[float | None, str]:
    """A deployment's p95 (first tokens, and short answers for `latency_p95`), without the
    sender with most answers over the threshold when the others' are enough and within it."""
    first_token_only = rule.kind == "ttft_p95"
    samples = (st.ttfts_ms if first_token_only else st.judged_ms()) if st else []
    if len(samples) < rule.min_requests:
        return None, ""
    whole = percentile(samples, 0.95)
    if whole is None or whole <= rule.threshold:
        return whole, ""
    senders = judged_by_sender(slots, name, first_token_only)
    if senders is None or len(senders) < 2:
        return whole, ""
    worst = max(senders, key=lambda s: senders[s].over(rule.threshold))
    others = [w for s, w in senders.items() if s != worst]
    left = sum(w.answers for w in others)
    p95 = weighted_percentile(others, 0.95)
    if p95 is None or left < rule.min_requests or p95 > rule.threshold:
        return whole, ""
    who = redact.text(worst) if worst != KEYLESS else "the keyless clients"
    slow, answered = senders[worst].over(rule.threshold), senders[worst].answers
    return p95, f"{who}: {slow:.0f} of {answered:.0f} answers over the threshold set aside, the others served fast"


# Kinds that are a state (1 while it holds) rather than a measure over a threshold.
_STATE_KINDS = frozenset({"circuit_open", "secret_refresh_failed"})
# What every worker of a server measures alike (see the module's doc).
_SHARED_KINDS = frozenset({"budget_percent", "circuit_open", "secret_refresh_failed"})


class AlertEngine:
    def __init__(
        self, notifier: Notifier, lead: bool = True, claims: AlertClaims | None = None, named: bool = False
    ) -> None:
        self.notifier = notifier
        self.lead = lead  # False: another process notifies the kinds every process sees alike
        self.claims = claims  # shared_state: the shared kinds are claimed in Redis before they are sent
        self.named = named  # several processes notify: the traffic kinds' messages name theirs
        self.firing: dict[tuple[str, str], Alert] = {}
        self.recent: deque[Alert] = deque(maxlen=RECENT)
        self._notified_at: dict[tuple[str, str], float] = {}
        self._silenced: set[str] = set()  # ids of firing alerts whose notification the cooldown held back

    # -- what each kind measures: (subject, value) pairs; a None value changes nothing --------

    def _measure(
        self, rule: AlertRule, live: Live, window: Window, budgets: Iterable[tuple[Budget, float]], now: float
    ) -> Iterator[Measure]:
        kind = rule.kind
        if kind == "circuit_open":
            for d in live.deployments:
                if not rule.deployments or d.name in rule.deployments:
                    yield d.name, 1.0 if live.router.health(d.index)["circuit"] == "open" else 0.0, ""
            return
        if kind == "budget_percent":
            for b, spent in budgets:
                if not rule.budgets or b.name in rule.budgets:
                    yield b.name, spent / b.limit_usd * 100, ""
            return
        if kind == "secret_refresh_failed":
            # Only the failing references: one that reads again is no longer seen, so it resolves.
            for reference in sorted(secrets.STATUS.failing):
                yield redact.text(reference), 1.0, ""
            return
        slots = window.since(now - rule.window_s)
        if kind in ("error_rate", "latency_p95", "ttft_p95"):
            stats = by_deployment(slots)
            for d in live.deployments:
                if rule.deployments and d.name not in rule.deployments:
                    continue
                st = stats.get(d.name)
                if kind == "error_rate":
                    yield d.name, *_error_rate(rule, st)
                else:
                    yield d.name, *_latency(rule, st, slots, d.name)
            return
        requests = sum(s.requests for s in slots)
        if kind == "spend_per_hour":
            yield "all", sum(s.cost_usd for s in slots) * 3600 / rule.window_s, ""
        elif kind == "poison_requests":
            yield "all", float(sum(s.poison for s in slots)), ""
        elif kind == "shed_rate":
            shed = sum(s.shed for s in slots)
            total = requests + shed
            yield "all", shed / total if total >= rule.min_requests else None, ""
        elif kind == "rate_limited_rate":
            limited = sum(s.rate_limited for s in slots)
            yield "all", limited / requests if requests >= rule.min_requests else None, ""

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(
        self,
        cfg: Alerts,
        live: Live,
        window: Window,
        budgets: Iterable[tuple[Budget, float]],
        now: float | None = None,
    ) -> None:
        """`budgets`: each budget's spend this period (USD), as admission counts it."""
        now = time.time() if now is None else now
        budgets = list(budgets)
        self.notifier.webhooks = cfg.webhooks
        rules = {r.name: r for r in cfg.rules}
        for key in [k for k in self.firing if k[0] not in rules]:  # a reload removed the rule
            self._resolve(key, None, self.firing[key].value, now)
        for rule in cfg.rules:
            seen: set[str] = set()
            for subject, value, note in self._measure(rule, live, window, budgets, now):
                seen.add(subject)
                if value is None:
                    continue
                key = (rule.name, subject)
                breach = value > 0.5 if rule.kind in _STATE_KINDS else value > rule.threshold
                alert = self.firing.get(key)
                if breach and alert is None:
                    self._fire(rule, subject, value, now, cfg, note)
                elif alert is not None and not breach:
                    self._resolve(key, rule, value, now, cfg, note)
                elif alert is not None:  # the message says the value it shows, not the one it fired at
                    alert.value = value
                    alert.message = _message(rule, subject, value, "firing", self.named, note)
            for key in [k for k in self.firing if k[0] == rule.name and k[1] not in seen]:
                self._resolve(key, rule, self.firing[key].value, now, cfg)  # its subject is gone

    def adopt(self, alerts: Iterable[dict[str, Any]], cfg: Alerts) -> int:
        """Takes up shared alerts that another process raised and Redis says still fire
        (`AlertClaims.firing`), as this process's own, without notifying them: the next
        evaluation resolves those that are clear, under their id. Returns how many."""
        rules = {r.name: r for r in cfg.rules}
        taken = 0
        for a in alerts:
            rule = rules.get(a.get("rule"))  # type: ignore[arg-type]
            if rule is None or rule.kind not in _SHARED_KINDS or a.get("kind") != rule.kind:
                continue
            try:
                alert = Alert(**{f: a[f] for f in Alert.__dataclass_fields__})
            except (KeyError, TypeError):
                continue
            key = (rule.name, str(alert.subject))
            if key in self.firing or alert.state != "firing":
                continue
            self.firing[key] = alert
            taken += 1
        return taken

    def _fire(self, rule: AlertRule, subject: str, value: float, now: float, cfg: Alerts, note: str = "") -> None:
        key = (rule.name, subject)
        threshold = 0.5 if rule.kind in _STATE_KINDS else rule.threshold
        alert = Alert(
            f"alr_{_PREFIX}{next(_ids):06x}", rule.name, rule.kind, subject, rule.severity, "firing",
            value, threshold, now, None, _message(rule, subject, value, "firing", self.named, note), INSTANCE,
        )  # fmt: skip
        self.firing[key] = alert
        last = self._notified_at.get(key)
        if last is not None and now - last < cfg.cooldown_s:
            self._silenced.add(alert.id)
            return
        self._notified_at[key] = now
        self._notify(rule, "firing", alert, cfg)

    def _resolve(
        self,
        key: tuple[str, str],
        rule: AlertRule | None,
        value: float,
        now: float,
        cfg: Alerts | None = None,
        note: str = "",
    ) -> None:
        alert = self.firing.pop(key)
        alert.state, alert.resolved_at, alert.value = "resolved", now, value
        if rule is not None:
            alert.message = _message(rule, alert.subject, value, "resolved", self.named, note)
        self.recent.appendleft(alert)
        if alert.id in self._silenced:
            self._silenced.discard(alert.id)
        elif rule is not None and cfg is not None:
            self._notify(rule, "resolved", alert, cfg)

    def _notify(self, rule: AlertRule, event: str, alert: Alert, cfg: Alerts) -> None:
        if not self.lead and rule.kind in _SHARED_KINDS:
            return
        names = rule.webhooks if rule.webhooks is not None else list(cfg.webhooks)
        body = alert.to_dict()
        if self.claims is not None and rule.kind in _SHARED_KINDS:
            self.claims.submit(rule.name, alert.subject, Transition(event, names, body, cfg.cooldown_s))
            return
        for name in names:
            self.notifier.enqueue(Notification(name, event, body))

    def test(self, cfg: Alerts, webhooks: list[str], now: float) -> None:
        """Sends a test alert (already resolved, rule `test`) to `webhooks`, to check their set-up."""
        self.notifier.webhooks = cfg.webhooks
        alert = Alert(
            f"alr_{_PREFIX}{next(_ids):06x}", "test", "test", "edgeroute", "info", "resolved", 0.0, 0.0, now, now,
            "test: a test notification from edgeroute (POST /admin/alerts/test)", INSTANCE,
        )  # fmt: skip
        for name in webhooks:
            self.notifier.enqueue(Notification(name, "test", alert.to_dict()))

    def listing(self) -> dict[str, list[dict[str, Any]]]:
        firing = sorted(self.firing.values(), key=lambda a: a.started_at, reverse=True)
        return {"firing": [a.to_dict() for a in firing], "recent": [a.to_dict() for a in self.recent]}
