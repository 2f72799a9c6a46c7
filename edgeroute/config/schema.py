"""The config's schema: the pydantic models of the YAML file, and nothing else.

A config declares providers (where and how to call), deployments (a model at a
provider, with prices, context window, weight and tags), public models (what clients
ask for, mapped to deployments) and rules. Validation is strict: an unknown key is an
error. Checks across sections live in `checks`, loading and error reporting in `loader`.
"""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from edgeroute import egress
from edgeroute.cache.settings import CacheStore, RouteCache
from edgeroute.config import prices
from edgeroute.config.priority import PrioritySettings
from edgeroute.governance.settings import Governance
from edgeroute.outcome import FallbackKey
from edgeroute.requestlog.settings import RequestLog
from edgeroute.router_shadow.settings import CandidateRouter
from edgeroute.secrets import REFERENCE_PREFIXES
from edgeroute.telemetry import settings as telemetry_settings
from edgeroute.telemetry.settings import LogFormat, LogLevel

ProviderKind = Literal["openai", "openai_compatible", "azure", "anthropic", "gemini", "bedrock"]
Strategy = Literal["weighted", "p2c_ewma", "lowest_cost", "least_busy", "fastest"]
TaskType = Literal[
    "code", "math", "reasoning", "creative_writing", "summarization", "extraction", "translation", "knowledge_qa",
    "chat", "other",
]  # fmt: skip
FallbackClass = FallbackKey  # a `fallbacks_on` key (edgeroute.outcome)


MAX_FLUSH_INTERVAL_S = 1.0  # the ledger's longest batch interval: what a crash may lose


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Seconds. `first_byte` bounds the wait for response headers (and, for streams, the
    first content event: text, a tool call, reasoning); `idle` bounds the gap between stream chunks."""

    connect: float = Field(5.0, gt=0)
    first_byte: float = Field(60.0, gt=0)
    idle: float = Field(30.0, gt=0)
    total: float = Field(600.0, gt=0)


class HealthCheck(_Strict):
    """Active probing of a provider's deployments."""

    interval: float = Field(10.0, gt=0)
    timeout: float = Field(5.0, gt=0)
    path: str = "/models"


class Tls(_Strict):
    """TLS to a provider beyond the system trust store: a private CA (a corporate gateway,
    a self-hosted model server) and a client certificate for mutual TLS. Paths to PEM files."""

    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None  # when the key is not in client_cert's file


class Provider(_Strict):
    kind: ProviderKind = "openai"
    base_url: str
    api_key: str | None = None
    max_connections: int = Field(256, ge=1)
    timeouts: Timeouts = Timeouts()
    tls: Tls | None = None
    health_check: HealthCheck | None = None
    headers: dict[str, str] = {}
    # A forward proxy for this provider's connections: an http:// URL (or a secret reference to
    # one, as it may hold credentials), or `direct`; unset: HTTPS_PROXY/HTTP_PROXY/NO_PROXY apply.
    proxy: str | None = None
    # Provider-specific settings (e.g. Azure's api_version, Bedrock's region).
    options: dict[str, Any] = {}

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if "@" in urllib.parse.urlsplit(v).netloc:
            # The upstream client never sends a URL's user:password (nor should a URL carry a
            # secret that logs and versions would show): refused rather than silently dropped.
            raise ValueError(
                "holds credentials (user:password@), which are never sent: give the key as api_key "
                "(a secret reference such as env:NAME) or in headers"
            )
        return v.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v is not None and v != "direct" and not v.startswith(("env:", "file:", "exec:")):
            egress.parse_proxy(v)  # a ValueError names what is wrong, never the credentials
        return v


class PriceWindow(_Strict):
    """A local time of day in which a price is multiplied (e.g. 0.5 for an off-peak discount)."""

    start: str
    end: str
    utc_offset_minutes: int = Field(0, ge=-14 * 60, le=14 * 60)
    multiplier: float = Field(ge=0, le=1000)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        prices.parse_hhmm(v)
        return v


MAX_PRICE_USD = 1e6

# Built-in tools an upstream runs itself and bills per call beside tokens (OpenAI's Responses
# `web_search_call`, `file_search_call`, `code_interpreter_call`, `image_generation_call` items;
# Anthropic's `usage.server_tool_use.web_search_requests` / `web_fetch_requests`).
ToolKind = Literal["web_search", "web_fetch", "file_search", "code_interpreter", "image_generation"]
TOOL_KINDS: tuple[ToolKind, ...] = get_args(ToolKind)


class Price(_Strict):
    """USD per million tokens, plus per request. In YAML also ``catalogue`` or ``{catalogue: NAME, ...}``
    (see `edgeroute/config/prices.py`), resolved to these fields when the config loads."""

    # At most a million USD a unit: a price of 1e308 (a typo, or an admin's PATCH) made every
    # request's cost infinite in nano-dollars, and every request on the route a 500.
    input_per_mtok: float = Field(0.0, ge=0, le=MAX_PRICE_USD)
    output_per_mtok: float = Field(0.0, ge=0, le=MAX_PRICE_USD)
    cached_input_per_mtok: float | None = Field(None, ge=0, le=MAX_PRICE_USD)  # prompt-cache reads (default: input)
    cache_write_per_mtok: float | None = Field(None, ge=0, le=MAX_PRICE_USD)  # prompt-cache writes (default: input)
    # Anthropic's 1-hour prompt-cache writes (default: 2x input where cache writes have a price, as
    # Anthropic bills them; else input): `cache_write_per_mtok` is its 5-minute write.
    cache_write_1h_per_mtok: float | None = Field(None, ge=0, le=MAX_PRICE_USD)
    # Audio tokens (OpenAI's `*_tokens_details.audio_tokens`), in and out (default: the text prices).
    audio_input_per_mtok: float | None = Field(None, ge=0, le=MAX_PRICE_USD)
    audio_output_per_mtok: float | None = Field(None, ge=0, le=MAX_PRICE_USD)
    per_request: float = Field(0.0, ge=0, le=MAX_PRICE_USD)
    # USD a call of each built-in tool the upstream runs (a code interpreter: a container); unset: free.
    tool_calls: dict[ToolKind, Annotated[float, Field(ge=0, le=MAX_PRICE_USD)]] = {}
    windows: list[PriceWindow] = []
    source: str | None = None  # set by a catalogue reference, e.g. "catalogue:gpt-4o@2025-06-15"


class MediaTokens(_Strict):
    """Tokens a budget reserves for each part of a kind on this deployment, in place of the
    default allowance (edgeroute.cost.media): a model that counts an image as many more tokens
    (gpt-4o-mini: about 33 times gpt-4o's count) needs `image` set to its largest count."""

    image: int | None = Field(None, ge=0)
    audio: int | None = Field(None, ge=0)
    file: int | None = Field(None, ge=0)


class Deployment(_Strict):
    provider: str
    model: str
    price: Price = Price()
    context_window: int = Field(0, ge=0)
    weight: int = Field(1, ge=0)
    tags: list[str] = []
    encoding: Literal["o200k_base", "cl100k_base", "claude_estimate", "gemini_estimate"] | None = None
    drained: bool = False  # out of every model's list: no new requests (POST /admin/deployments/{name}/drain)
    # Capacity (edgeroute.capacity): requests in flight at most; when every deployment a request
    # may use is full, up to `max_queue` requests wait for a slot, each at most `queue_timeout_ms`.
    max_concurrency: int | None = Field(None, ge=1)
    max_queue: int = Field(0, ge=0)
    queue_timeout_ms: int | None = Field(None, ge=1)
    reserve_percent: int = Field(0, ge=0, le=100)  # of max_concurrency, for the highest priority class only
    media_tokens: MediaTokens | None = None  # budgets' per-part allowance for images, audio, files

    @model_validator(mode="after")
    def _queue_needs_a_deadline(self) -> Deployment:
        if self.max_queue and self.queue_timeout_ms is None:
            raise ValueError("max_queue needs queue_timeout_ms (a queue without a deadline could wait forever)")
        if self.max_queue and self.max_concurrency is None:
            raise ValueError("max_queue needs max_concurrency (a deployment without a limit never queues)")
        return self

    @field_validator("price", mode="before")
    @classmethod
    def _catalogue_price(cls, v: Any, info: ValidationInfo) -> Any:
        return prices.resolve_price_input(v, str(info.data.get("model", "")))


class Hedge(_Strict):
    percentile: float = Field(95.0, gt=0, lt=100)
    delay_ms: float | None = Field(None, gt=0)
    min_delay_ms: float = Field(50.0, ge=0)
    budget_percent: float = Field(5.0, ge=0, le=100)
    min_samples: int = Field(20, ge=1)


class PolicyCandidate(_Strict):
    route: str  # a public model with deployments
    model: str  # the router model's output (LLM name) that predicts this route's quality


class Policy(_Strict):
    """Cheapest-sufficient routing: the cheapest candidate whose predicted score reaches the threshold."""

    candidates: list[PolicyCandidate] = Field(min_length=1)
    threshold: float = Field(ge=0, le=1)


class Variant(_Strict):
    route: str
    percent: float = Field(ge=0, le=100)


class Experiment(_Strict):
    """A sticky A/B split of a model's traffic between routes."""

    variants: list[Variant] = Field(min_length=1)
    sticky: Literal["user", "key"] = "user"


class Shadow(_Strict):
    """Mirror a sample of requests to a candidate route; answers are recorded, never returned."""

    model: str
    percent: float = Field(gt=0, le=100)
    # Mirrors of the route's requests running at once in a process; past it one is skipped (counted).
    max_in_flight: int = Field(64, ge=1)


class Model(_Strict):
    # Empty for a model that only chooses among other routes (`policy` or `experiment`).
    deployments: list[str] = []
    policy: Policy | None = None
    experiment: Experiment | None = None
    shadow: Shadow | None = None
    strategy: Strategy = "weighted"
    fallbacks: list[str] = []
    context_window_fallbacks: list[str] = []
    # Fallback models by attempt outcome (edgeroute.outcome), tried before `fallbacks` when that outcome occurs.
    fallbacks_on: dict[FallbackKey, list[str]] = {}
    hedge: Hedge | None = None
    timeouts: Timeouts | None = None
    max_attempts: int = Field(4, ge=1, le=20)
    cache: RouteCache | None = None  # answers cached per route (edgeroute/cache)


class TimeWindow(_Strict):
    start: str
    end: str
    utc_offset_minutes: int = 0


class RuleWhen(_Strict):
    models: list[str] = []
    tags: list[str] = []
    users: list[str] = []
    teams: list[str] = []
    roles: list[str] = []
    min_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    keywords: list[str] = []
    patterns: list[str] = []
    pii: list[Literal["email", "phone", "payment_card", "iban", "national_id"]] = []
    time: TimeWindow | None = None
    tasks: list[TaskType] = []
    # the task model's probability of its prediction must reach this (a rule on `tasks` only)
    min_task_confidence: float | None = Field(None, ge=0.0, le=1.0)
    # the request's priority class (its key's or header's, else the default) is one of these
    priority: list[str] = []

    @field_validator("priority", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _confidence_needs_tasks(self) -> RuleWhen:
        if self.min_task_confidence is not None and not self.tasks:
            raise ValueError("min_task_confidence needs `tasks`")
        return self


class RuleThen(_Strict):
    route: str | None = None
    deployments: list[str] = []
    require_tags: list[str] = []
    exclude_tags: list[str] = []
    strategy: Strategy | None = None
    reject: str | None = None
    priority: str | None = None  # the request's priority class (edgeroute.config.priority)


class Rule(_Strict):
    name: str
    priority: int = 0
    when: RuleWhen = RuleWhen()
    then: RuleThen


class RetryBudget(_Strict):
    """Each route's retries: `ratio` of its requests sent upstream in the last `ttl_ms`, plus `min_per_sec`."""

    ratio: float = Field(0.2, ge=0)
    min_per_sec: int = Field(10, ge=0)
    ttl_ms: int = Field(10_000, ge=1000)


class HealthSettings(_Strict):
    consecutive_failures: int = Field(5, ge=1)
    base_ejection_ms: int = Field(30_000, ge=0)
    max_ejection_ms: int = Field(300_000, ge=0)
    max_ejected_percent: int = Field(50, ge=0, le=100)
    ewma_decay_ms: int = Field(10_000, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)  # an error rate that opens the circuit...
    min_requests: int = Field(20, ge=1)  # ...once this many requests were seen recently
    # A deployment that loses hedge races with no response head after `lost_race_factor` times its
    # usual answer time looks hung: from the `lost_races_in_a_row`th such loss in a row, each is a
    # timeout for its circuit. Under 2, a loser merely slower than its hedge (which waits about
    # its p95 plus the hedge's answer) would look hung.
    lost_races_in_a_row: int = Field(3, ge=1)
    lost_race_factor: float = Field(3.0, ge=2)


class Retry(_Strict):
    """Backoff between attempts on the same deployment (full jitter)."""

    base_ms: float = Field(25.0, ge=0)
    max_ms: float = Field(2_000.0, ge=0)
    max_retry_after_s: float = Field(10.0, ge=0)


class Server(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_in_flight: int = Field(4096, ge=1)
    # Request bodies held at once by the requests in flight (a body costs the proxy about four
    # times its size while it is parsed and sent on); past it, 503 with Retry-After. A request
    # alone is always let in. See server._admitted.
    max_body_bytes_in_flight: int = Field(256 * 1024 * 1024, ge=1024)
    drain_timeout: float = Field(30.0, ge=0)
    # The `service_tier` values clients may ask for (edgeroute.service_tiers): `priority` is billed
    # above the price its deployments are priced at, so it is refused unless listed here.
    service_tiers: list[str] = ["auto", "default", "flex"]
    # Keys clients must present (by reference); none means no authentication (sidecar on loopback).
    api_keys: list[str] = []
    # One JSON line per request on stderr: the decision (route, rule and why), who served, cost.
    decision_log: bool = False
    # Hostile-input bounds (see SECURITY.md): a connection must deliver a request's headers
    # within `header_timeout` seconds of opening or of its previous answer (slowloris), and
    # the body within `body_timeout` seconds; bodies of other types are refused with 415.
    header_timeout: float = Field(10.0, gt=0, le=300)
    body_timeout: float = Field(30.0, gt=0)
    # A streaming client that reads nothing for this long is disconnected (nginx's send_timeout):
    # it held its upstream connection and capacity slot for the provider's total timeout.
    send_timeout: float = Field(60.0, gt=0)
    # Client connections held open at once, per process; unset: from the open-file limit (see
    # `http_server.connection_cap`). At the cap the longest-idle connections are closed first.
    max_client_connections: int | None = Field(None, ge=1)
    accept_content_types: list[str] = ["application/json"]
    # With no keys configured, requests naming another Host, or carrying an Origin, are
    # refused (DNS rebinding, CSRF from a web page); these lists allow more ("*": any).
    allowed_hosts: list[str] = []
    allowed_origins: list[str] = []
    log_format: LogFormat = "text"  # or json: one JSON object per line (`edgeroute.telemetry.logs`)
    log_level: LogLevel = "warning"
    # With keys configured, `/metrics` (team names, traffic per route and key) needs a key of
    # role viewer or above (Prometheus: `authorization: {credentials: …}`); true serves it to anyone.
    metrics_public: bool = False
    # With virtual keys, a request naming a file or vector store kept at the provider (by id) is
    # refused: the provider account is every tenant's (`edgeroute.provider_files`). `shared`
    # says its files are meant for every tenant, and passes such requests.
    provider_files: Literal["refused", "shared"] = "refused"


# -- cost control (edgeroute/cost/): keys, limits, budgets, ledger, shared state ------------------


class Limit(_Strict):
    """Requests and tokens (prompt + max completion) per minute, as token buckets, and the
    requests in flight at once (`max_parallel`, held until the answer is sent)."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_parallel: int | None = Field(None, ge=1)


class VirtualKey(_Strict):
    """A client key. The token is given by reference (``env:``/``file:``/literal) or as its
    SHA-256 hex digest; only the digest is kept in memory, and the id is what logs and the
    ledger show."""

    token: str | None = None
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    team: str | None = None
    user: str | None = None
    role: str | None = None
    limits: Limit | None = None
    priority: str | None = None  # its requests' priority class (edgeroute.config.priority)
    priorities: list[str] = []  # further classes it may ask for with x-edgeroute-priority


class RateLimits(_Strict):
    """`per_key`'s rpm/tpm apply to every key whose own `limits` set neither, its max_parallel to
    every key without one (anonymous clients share one);
    `deployments` are the provider's limits, which selection routes around."""

    per_key: Limit | None = None
    models: dict[str, Limit] = {}
    deployments: dict[str, Limit] = {}
    # The output a request naming no max_tokens holds in TPM buckets per answer until it settles;
    # None: what budgets reserve for it. A TPM holds about TPM / this many such requests at once.
    unbounded_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)


class BudgetAction(_Strict):
    at_percent: float = Field(gt=0, le=10_000)
    action: Literal["notify", "downgrade", "block"]
    to: str | None = None  # downgrade: the cheaper public model
    # notify: POSTed a JSON event once per period. A URL, or a reference to one (`env:NAME`,
    # `file:PATH`, `exec:COMMAND`, resolved when sent): a Slack webhook's URL is its credential,
    # and a reference keeps it out of the stored config versions.
    webhook: str | None = None

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://", *REFERENCE_PREFIXES)):
            raise ValueError("must start with http:// or https://, or be a reference (env:, file:, exec:)")
        return v


# A budget's most, in USD: its limit is counted in nano-dollars, and one of 1e300 (times its
# block percentage) was infinite there, so every request it covered was a 500.
MAX_LIMIT_USD = 1e9


class Budget(_Strict):
    """A spend limit over a period for one scope: `match` names one key/team/user/model;
    without it, each key (team, user, model) gets its own budget of `limit_usd`."""

    name: str
    scope: Literal["key", "team", "user", "model", "global"]
    match: str | None = None
    limit_usd: float = Field(gt=0, le=MAX_LIMIT_USD)
    period: Literal["day", "month", "rolling"] = "month"
    window_hours: float | None = Field(None, gt=0, le=24 * 366)  # for period: rolling
    utc_offset_minutes: int = Field(0, ge=-14 * 60, le=14 * 60)  # where calendar periods start
    actions: list[BudgetAction] = [BudgetAction(at_percent=100, action="block")]


class Budgets(_Strict):
    # Completion tokens reserved when a request sets no max_tokens (an Anthropic provider's
    # default_max_tokens instead where that is more: `Reservations._completion`).
    reserve_max_tokens: int = Field(4096, ge=1)
    # Calls of each built-in tool (web search, ...) reserved when a request sets no bound on
    # them (`max_uses`, `max_tool_calls`): a model may make more, which are paid as made.
    reserve_tool_calls: int = Field(1, ge=1, le=1000)
    limits: list[Budget] = []


class SharedStateLiveness(_Strict):
    """Each instance's heartbeat in Redis (with a shared ledger): renewed every `beat_s`, it
    expires `ttl_s` after the last renewal, and every `sweep_s` the others look for expired ones,
    whose unsettled requests one of them records as `crashed` (`cost.control.liveness`). An
    instance silent past `ttl_s` (a stalled VM) is taken over as if it had died: a longer `ttl_s`
    rides out longer stalls, and records a dead instance's requests that much later."""

    beat_s: float = Field(1.5, gt=0, le=60)
    ttl_s: float = Field(6.0, gt=0, le=600)
    sweep_s: float = Field(2.0, gt=0, le=60)

    @model_validator(mode="after")
    def _outlives_a_late_beat(self) -> SharedStateLiveness:
        if self.ttl_s <= 2 * self.beat_s:
            raise ValueError(
                f"ttl_s ({self.ttl_s:g}) must be more than twice beat_s ({self.beat_s:g}): a heartbeat a little"
                " late would let another instance take this one's requests over while it runs them"
            )
        return self


class SharedState(_Strict):
    """Redis for budgets, reservations and rate-limit counters shared by several instances."""

    redis_url: str
    on_unavailable: Literal["open", "closed"] = "open"
    timeout_ms: int = Field(200, ge=1)
    prefix: str = "edgeroute"
    liveness: SharedStateLiveness = Field(default_factory=SharedStateLiveness)


class Ledger(_Strict):
    """Where spend is written: one row per request, batched off the request path."""

    backend: Literal["sqlite", "postgres", "memory"] = "sqlite"
    path: str = "edgeroute-ledger.db"  # sqlite
    dsn: str | None = None  # postgres, a secret reference (env:/file:/literal)
    flush_interval: float = Field(0.5, gt=0, le=MAX_FLUSH_INTERVAL_S)
    record_attempts: bool = True
    # `low`: the writer yields the CPU to the event loop (a better p99); where other processes
    # contend for the CPU it can fall behind, and a crash then loses more than one interval.
    # `normal` keeps the one-interval bound on a shared host.
    writer_priority: Literal["low", "normal"] = "normal"
    # While the ledger cannot write, its records wait in memory (lost to a kill -9). `open`
    # serves on; `closed` refuses new requests (503) while more than `max_unwritten` wait.
    on_unavailable: Literal["open", "closed"] = "open"
    max_unwritten: int = Field(0, ge=0)


class Feedback(_Strict):
    max_shift: float = Field(0.15, ge=0, le=1)
    cost_weight: float = Field(0.0, ge=0)
    state_path: str | None = None
    # Whose requests a rating steers. `per_team`: a team's ratings its own team's requests
    # alone; the operator's (keys of no team, keyless callers) everyone's. `balanced`: one set
    # of shifts for everyone, where a team's ratings count up to all other tenants' together
    # (one team alone moves nothing). `pooled`: every rating steers everyone, for a gateway
    # whose teams all trust one another.
    tenants: Literal["per_team", "balanced", "pooled"] = "per_team"


class Learning(_Strict):
    """Learned routing models (`builtin`: the ones shipped with edgeroute) and feedback learning."""

    task_model: str = "builtin"
    router_model: str = "builtin"
    feedback: Feedback | None = None
    # `POST /v1/feedback` calls a minute per key (per client address without keys), per process:
    # an unknown request id costs a few database reads, so a flood must meet a limit.
    feedback_rpm: int = Field(600, ge=1)
    shadow_log: str | None = None
    # The shadow log's size past which it is rotated (`<file>.1` ...), and how many rotated files are kept.
    shadow_log_max_bytes: int = Field(100 * 2**20, ge=4096)
    shadow_log_keep: int = Field(5, ge=1, le=100)
    # Salts a keyed request's experiment bucket (a secret reference: env:/file:/literal); unset,
    # a random one the governance store keeps (else derived from the config's key secrets; `sticky.py`).
    experiment_salt: str | None = None
    candidate_router: CandidateRouter | None = None  # evaluated beside the running router, never routing


class Config(_Strict):
    server: Server = Server()
    providers: dict[str, Provider]
    deployments: dict[str, Deployment]
    models: dict[str, Model]
    rules: list[Rule] = []
    retry: Retry = Retry()
    retry_budget: RetryBudget = RetryBudget()
    health: HealthSettings = HealthSettings()
    keys: dict[str, VirtualKey] = {}
    rate_limits: RateLimits = RateLimits()
    budgets: Budgets = Budgets()
    ledger: Ledger | None = None
    request_log: RequestLog = RequestLog()
    shared_state: SharedState | None = None
    learning: Learning = Learning()
    cache: CacheStore = CacheStore()
    alerts: telemetry_settings.Alerts = telemetry_settings.Alerts()
    tracing: telemetry_settings.Tracing = telemetry_settings.Tracing()
    governance: Governance = Governance()
    priority: PrioritySettings = PrioritySettings()

    def core_json(self) -> bytes:
        """The config in the Rust core's `RouterSpec` form."""
        deps = []
        for name, d in self.deployments.items():
            spec: dict[str, Any] = {
                "name": name,
                "provider": d.provider,
                "model": d.model,
                "weight": d.weight,
                "input_per_mtok": d.price.input_per_mtok,
                "output_per_mtok": d.price.output_per_mtok,
                "context_window": d.context_window,
                "tags": d.tags,
                "max_concurrency": d.max_concurrency,
                "reserve_percent": d.reserve_percent,
            }
            if d.encoding:
                spec["encoding"] = d.encoding
            deps.append(spec)
        models = []
        for name, m in self.models.items():
            spec = {
                "name": name,
                "deployments": m.deployments,
                "strategy": m.strategy,
                "fallbacks": m.fallbacks,
                "context_window_fallbacks": m.context_window_fallbacks,
                "hedge": m.hedge.model_dump() if m.hedge else None,
            }
            if m.policy is not None:
                spec["policy"] = m.policy.model_dump()
            if m.experiment is not None:
                spec["experiment"] = {"name": name, **m.experiment.model_dump()}
            models.append(spec)
        return orjson.dumps(
            {
                "deployments": deps,
                "models": models,
                "rules": [r.model_dump(exclude_none=True) for r in self.rules],
                "retry_budget": self.retry_budget.model_dump(),
                "health": self.health.model_dump(),
                "priority_classes": self.priority.classes,
                "default_priority": self.priority.default_class,
            }
        )
