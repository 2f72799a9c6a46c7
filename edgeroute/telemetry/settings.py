"""The config sections of telemetry: logging, tracing and alerts (schema and checks).

Imports nothing of edgeroute but `secrets`, so that the config package can import it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeroute import secrets

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


AlertKind = Literal[
    "error_rate", "latency_p95", "ttft_p95", "circuit_open", "budget_percent", "spend_per_hour", "shed_rate",
    "rate_limited_rate", "poison_requests", "secret_refresh_failed",
]  # fmt: skip

# What each kind measures, and over what subjects (for docs and messages).
ALERT_KINDS: dict[str, str] = {
    "error_rate": "share of a deployment's attempts that failed (0..1)",
    "latency_p95": "a deployment's p95 latency of answered attempts, in ms",
    "ttft_p95": "a deployment's p95 time to first token of streams, in ms",
    "circuit_open": "1 while a deployment's circuit is open",
    "budget_percent": "percent of a budget spent this period",
    "spend_per_hour": "spend in USD per hour over the window",
    "shed_rate": "share of requests refused at capacity (0..1)",
    "rate_limited_rate": "share of requests answered 429 (0..1)",
    "poison_requests": "requests that failed the same way on several deployments, in the window",
    "secret_refresh_failed": "1 while a file: or exec: secret cannot be read again (the last good value is used)",
}
_DEPLOYMENT_KINDS = frozenset({"error_rate", "latency_p95", "ttft_p95", "circuit_open"})


class Webhook(_Strict):
    """Where notifications go. `url` may be a reference (`env:NAME`, `file:PATH`): a Slack
    webhook URL is a secret."""

    url: str
    format: Literal["json", "slack"] = "json"
    headers: dict[str, str] = {}
    timeout_s: float = Field(5.0, gt=0, le=60)


class AlertRule(_Strict):
    name: str = Field(min_length=1, max_length=100)
    kind: AlertKind
    threshold: float = 0.0  # fires when the value is above it (circuit_open: ignored)
    window_s: float = Field(60.0, ge=5, le=3600)
    # Rates and percentiles need this many attempts (or requests) in the window to change state.
    min_requests: int = Field(10, ge=1)
    deployments: list[str] = []  # error_rate, latency_p95, ttft_p95, circuit_open: only these (default all)
    budgets: list[str] = []  # budget_percent: only these (default all)
    severity: Literal["info", "warning", "critical"] = "warning"
    webhooks: list[str] | None = None  # names in `alerts.webhooks`; default all

    @model_validator(mode="after")
    def _subjects_fit_kind(self) -> AlertRule:
        if self.deployments and self.kind not in _DEPLOYMENT_KINDS:
            raise ValueError(f"'deployments' applies to {sorted(_DEPLOYMENT_KINDS)}, not {self.kind}")
        if self.budgets and self.kind != "budget_percent":
            raise ValueError(f"'budgets' applies to budget_percent, not {self.kind}")
        return self


class Alerts(_Strict):
    """In-process alerting: rules over a sliding window, evaluated every `interval_s`."""

    interval_s: float = Field(5.0, ge=1, le=300)
    cooldown_s: float = Field(300.0, ge=0)  # after a notification, no new one for the same alert this long
    webhooks: dict[str, Webhook] = {}
    rules: list[AlertRule] = []

    @model_validator(mode="after")
    def _names(self) -> Alerts:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique: {dup}")
        for r in self.rules:
            unknown = sorted(set(r.webhooks or ()) - set(self.webhooks))
            if unknown:
                raise ValueError(f"rule {r.name!r} names unknown webhooks {unknown}")
        return self


class Tracing(_Strict):
    """OpenTelemetry traces, exported by OTLP/HTTP; off unless `enabled`."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    sample_ratio: float = Field(0.1, ge=0, le=1)
    service_name: str = "edgeroute"
    headers: dict[str, str] = {}  # e.g. an API key for a hosted collector (values may be references)
    timeout_s: float = Field(5.0, gt=0, le=60)
    flush_interval_s: float = Field(2.0, gt=0, le=60)  # how often queued spans are sent
    max_queue: int = Field(2048, ge=1)  # spans waiting for export; beyond it they are dropped and counted


def cross_check(alerts: Alerts, tracing: Tracing, deployments: set[str], budgets: set[str]) -> list[tuple[str, str]]:
    """(path, problem) for names that do not exist and secret references that do not resolve."""
    problems: list[tuple[str, str]] = []
    for i, r in enumerate(alerts.rules):
        for j, d in enumerate(r.deployments):
            if d not in deployments:
                problems.append((f"alerts.rules[{i}].deployments[{j}]", f"unknown deployment {d!r}"))
        for j, b in enumerate(r.budgets):
            if b not in budgets:
                problems.append((f"alerts.rules[{i}].budgets[{j}]", f"unknown budget {b!r}"))
    for n, w in alerts.webhooks.items():
        if (problem := secrets.url_problem(w.url)) is not None:
            problems.append((f"alerts.webhooks.{n}.url", problem))
    refs = [(f"alerts.webhooks.{n}.headers.{h}", v) for n, w in alerts.webhooks.items() for h, v in w.headers.items()]
    refs += [(f"tracing.headers.{h}", v) for h, v in tracing.headers.items()]
    for where, ref in refs:
        try:
            secrets.resolve(ref)
        except secrets.SecretError as e:
            problems.append((where, str(e)))
    if not tracing.endpoint.startswith(("http://", "https://")):
        problems.append(("tracing.endpoint", "an OTLP/HTTP endpoint starts with http:// or https://"))
    return problems
