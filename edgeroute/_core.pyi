"""The Rust decision core of edgeroute (``rust/edgeroute-py``), as a Python extension.

A :class:`Router` is compiled once from a JSON router spec and is immutable;
``Router.reload`` returns a new one that keeps the health state, latency history
and budgets of unchanged deployments. Per request, ``Router.decide`` turns the
raw bytes of an OpenAI chat-completions body into a :class:`Decision`; after each
upstream attempt, ``Router.begin``/``Router.report`` feed health back. The core
does no I/O. Methods that do real work release the GIL.

Errors raised by the core all derive from :class:`EdgerouteError`.

Hand-written; checked against the extension with ``python -m mypy.stubtest edgeroute._core``.
"""

from collections.abc import Mapping, Sequence
from typing import Literal, TypedDict, final

__all__ = [
    "DETACH_FROM_BYTES",
    "OUTCOMES",
    "BadRequestError",
    "ConfigError",
    "ContextLengthError",
    "Decision",
    "EdgerouteError",
    "ForbiddenError",
    "NoDeploymentError",
    "Router",
    "UnknownModelError",
    "__version__",
    "redact_pii",
]

__version__: str
"""Version of the Rust crates the extension was built from."""

DETACH_FROM_BYTES: int
"""Bodies and texts at least this long are decided, counted or scanned with the GIL released;
shorter ones keep it (microseconds of work, whose caller, the event loop, waits either way)."""

class EdgerouteError(Exception):
    """Base of every error raised by the core."""

class BadRequestError(EdgerouteError):
    """The request body is invalid (HTTP 400).

    The message reads like the OpenAI API's own 400 messages. Also raised by
    ``Router.count_tokens`` for an unknown encoding name.
    """

class ContextLengthError(BadRequestError):
    """The request is longer than the context window of every deployment that may serve it
    (HTTP 400, OpenAI's ``context_length_exceeded``): no retry or fallback would help."""

class ForbiddenError(EdgerouteError):
    """A rule's ``reject`` action refuses this request (HTTP 403)."""

class UnknownModelError(EdgerouteError):
    """No route serves the requested model (HTTP 404)."""

class NoDeploymentError(EdgerouteError):
    """A route exists but no deployment may serve this request (HTTP 503)."""

class ConfigError(EdgerouteError):
    """The router config is invalid (raised by ``Router()`` and ``Router.reload``)."""

_Strategy = Literal["weighted", "p2c_ewma", "lowest_cost", "least_busy"]
_Encoding = Literal["o200k_base", "cl100k_base", "claude_estimate", "gemini_estimate"]
_Outcome = Literal[
    "success",
    "client_error",
    "context_window",
    "content_policy",
    "rate_limited",
    "server_error",
    "auth_error",
    "timeout",
    "connect_error",
]

OUTCOMES: tuple[_Outcome, ...]
"""Every attempt outcome ``Router.report`` accepts, in the core's order: the one
outcome vocabulary (the server's error classes and ``fallbacks_on`` keys use these names).

``success``; ``client_error``, ``context_window`` and ``content_policy`` (the request's
own fault: health untouched); ``rate_limited`` (cool-down, ``Retry-After``);
``server_error``, ``auth_error`` (the provider refused our credentials), ``timeout`` and
``connect_error`` (count towards ejection)."""

def redact_pii(text: str) -> str:
    """``text`` with each occurrence of personal data that the rules' ``pii`` detectors
    find replaced by a typed marker: ``[PII:email]``, ``[PII:phone]``,
    ``[PII:payment_card]``, ``[PII:iban]``, ``[PII:national_id]``. Overlapping
    occurrences become one marker. Releases the GIL."""

class _Health(TypedDict):
    """What ``Router.health`` returns (a plain ``dict`` at runtime)."""

    circuit: Literal["closed", "open", "half_open"]
    latency_ms: float
    """Peak-EWMA latency (0 until the first success)."""
    error_rate: float
    """EWMA of the failure share, 0..1."""
    consecutive_failures: int
    in_flight: int
    cooldown_ms: int
    """Milliseconds until a rate-limit cool-down ends (0: none)."""
    limit_hold_ms: int
    """Milliseconds until the provider limit edgeroute counts has a request again (0: none);
    selection routes around the deployment meanwhile. Not a failure."""
    requests: int
    """Attempts reported since start."""
    failures: int
    """Failed attempts reported since start."""
    sender_ejections: int
    """Times one sender's failures alone tripped and the deployment was ejected for that
    sender only (the circuit stayed as it was for the others), since start."""
    senders_ejected: int
    """Senders the deployment is ejected for now (their own ejection, or their own probe out)."""

@final
class Decision:
    """The router's answer for one request (read-only; made only by ``Router.decide``)."""

    @property
    def model(self) -> str:
        """The public model the client asked for."""

    @property
    def route(self) -> str:
        """The route (public model) that serves it after rules and context-window fallback."""

    @property
    def rule(self) -> str | None:
        """Name of the rule that matched, if any."""

    @property
    def reasons(self) -> list[str]:
        """Why the rule matched (one entry per condition), or why the default route applies."""

    @property
    def order(self) -> list[int]:
        """Deployment indices to try, in order: the choice, then the fallbacks."""

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens counted with ``encoding`` (or as passed to ``decide``)."""

    @property
    def tokens_exact(self) -> bool:
        """Whether ``prompt_tokens`` was counted exactly (else a four-bytes-a-token estimate)."""

    @property
    def encoding(self) -> _Encoding:
        """Tokenizer of the requested route's first deployment."""

    @property
    def stream(self) -> bool:
        """Whether the client asked for a stream."""

    @property
    def include_usage(self) -> bool:
        """Whether the client asked for ``stream_options.include_usage``."""

    @property
    def service_tier(self) -> str | None:
        """The request's ``service_tier`` as written (JSON text), when it names one."""

    @property
    def max_tokens(self) -> int | None:
        """``max_completion_tokens``, or else ``max_tokens``, from the body."""

    @property
    def choices(self) -> int:
        """Completions asked for: ``n``, or ``best_of`` when larger; at least 1."""

    @property
    def other_parts(self) -> int:
        """Content parts of a type other than ``text`` (images, audio, files): budgets reserve
        for them, reading the body only when there are some."""

    @property
    def prediction(self) -> str | None:
        """The request's Predicted Output (``prediction``) as written (JSON), when it has one
        that is not null: budgets reserve for its tokens at the output price."""

    @property
    def model_span(self) -> tuple[int, int]:
        """Byte range of the ``model`` value (quotes included) in the body."""

    @property
    def hedge_after_ms(self) -> float | None:
        """Send a hedge to ``order[1]`` after this many milliseconds without an answer."""

    @property
    def strategy(self) -> _Strategy:
        """Selection strategy used, as named in config files (e.g. ``"p2c_ewma"``)."""

    @property
    def task(self) -> str | None:
        """Predicted task type (``code``, ``math``, ...) when the classifier ran."""

    @property
    def task_confidence(self) -> float | None:
        """Probability of that task type."""

    @property
    def difficulty(self) -> float | None:
        """Predicted score of the strongest minus the weakest router-model output."""

    @property
    def scores(self) -> list[tuple[str, float]]:
        """Predicted score per router-model output (LLM name); empty when not classified."""

    @property
    def policy(self) -> str | None:
        """How a policy route chose its candidate, if one did."""

    @property
    def variant(self) -> str | None:
        """The experiment arm (route) this request was assigned to, if any."""

    @property
    def priority(self) -> int:
        """The request's priority class, as its position in ``priority_classes()`` (0: highest)."""

    @property
    def spilled(self) -> list[int]:
        """Deployments passed over as full for this class (placed last in ``order``)."""

@final
class Router:
    """A compiled router. Immutable: ``reload`` returns a new one that keeps health state."""

    def __new__(cls, config_json: bytes, task_model: bytes | None = None, router_model: bytes | None = None) -> Router:
        """Compiles a router from its JSON spec and loads the tokenizer tables.

        ``task_model`` and ``router_model`` (``ERLM`` bytes, both or neither) let it
        classify prompts, as policy routes and ``tasks`` rule conditions need.
        Raises :class:`ConfigError` when the spec or a model is invalid.
        """

    def reload(self, config_json: bytes, task_model: bytes | None = None, router_model: bytes | None = None) -> Router:
        """Compiles a new router, keeping the health, latency history, budgets and
        feedback shifts of deployments whose provider and model are unchanged; the
        models are replaced when both are given. Raises :class:`ConfigError`."""

    def set_price_multiplier(self, index: int, multiplier: float) -> None:
        """Scales deployment ``index``'s prices (a time-of-day window) for cost-aware selection."""

    def set_shifts(
        self,
        shifts: Mapping[tuple[str, str], float],
        teams: Mapping[str, Mapping[tuple[str, str], float]] | None = None,
    ) -> None:
        """Replaces the feedback-learning shifts added to predicted scores, keyed by (task, route):
        ``shifts`` for every request, and per team in ``teams`` those its requests see instead
        (where the team's own ratings made one)."""

    def count_prompt(self, body: bytes) -> int:
        """Exact prompt tokens of a chat ``body`` under its route's encoding; releases the GIL."""

    def warm_up(self) -> None:
        """Builds the tokenizer lookup tables now (~14 MB, tens of ms per encoding); releases the GIL."""

    @property
    def has_classifier(self) -> bool:
        """Whether the router can classify prompts."""

    def decide(
        self,
        body: bytes,
        tags: Sequence[str] | None = None,
        team: str | None = None,
        role: str | None = None,
        user: str | None = None,
        prompt_tokens: int | None = None,
        key: str | None = None,
        explain: bool = False,
        exact_tokens: bool = False,
        priority: str | None = None,
        priority_ceiling: str | None = None,
        sticky: str | None = None,
    ) -> Decision:
        """Decides how to serve a chat-completions ``body``; releases the GIL.

        ``tags`` (a list or tuple, not a single ``str``) come from
        ``x-edgeroute-tags``; ``team`` and ``role`` from the caller's key; ``user``
        overrides the body's ``user``. ``prompt_tokens``, when given (e.g. known
        from an earlier attempt of the same body), is used instead of counting.
        ``key`` (the caller's key id) keeps experiments sticky by key; ``explain``
        classifies the prompt even when nothing needs it, for explanations.
        Tokens are counted exactly when ``exact_tokens`` is set, a rule compares
        token counts or a context window is within reach; otherwise estimated
        (``Decision.tokens_exact`` says which).
        ``priority`` is the caller's class (its key's, or a header its key may set); a matched
        rule's class comes first; selection passes over deployments without a slot for it.
        ``priority_ceiling``, the highest class the caller's key may use: a rule that does not
        name its sender (``users``, ``teams``, ``roles``) cannot raise the class above it.
        ``sticky``: what an experiment sticky by user buckets a keyed caller by instead of
        ``user`` (its key's user, salted); rules still see ``user``.

        Raises :class:`BadRequestError` (bad body), :class:`ForbiddenError` (a rule rejects it),
        :class:`UnknownModelError` or :class:`NoDeploymentError`.
        """

    def body_for(self, body: bytes, decision: Decision, index: int) -> bytes:
        """``body`` with its ``model`` value replaced by deployment ``index``'s upstream
        model; every other byte is unchanged. ``ValueError`` for a bad index."""

    def acquire(self, index: int) -> None:
        """Takes a capacity slot on deployment ``index`` (an attempt starts). ``ValueError`` for a bad index."""

    def release(self, index: int) -> None:
        """Gives back a capacity slot on deployment ``index`` (never below zero)."""

    def has_room(self, index: int, priority: int) -> bool:
        """Whether deployment ``index`` has a free slot for a request of class rank ``priority``
        (only rank 0 may use the ``reserve_percent`` share)."""

    def slots(self, index: int) -> tuple[int, int | None]:
        """Requests in flight on deployment ``index``, and its ``max_concurrency`` (None: unbounded)."""

    def priority_classes(self) -> list[str]:
        """Priority class names, highest first."""

    def begin(self, index: int, sender: int = 0) -> None:
        """Marks an attempt of ``sender`` on deployment ``index`` as started (in-flight count,
        half-open probe; after the deployment's ejection for that sender alone, that sender's
        probe). ``ValueError`` for a bad index."""

    def any_sender_ejection(self) -> bool:
        """Whether some deployment (of any router in the process) may be ejected for a sender
        alone: one atomic read; while ``False`` no request need ask ``ejected_for``."""

    def ejected_for(self, index: int, sender: int) -> bool:
        """Whether deployment ``index`` is ejected for ``sender`` alone now (its own ejection,
        or its own probe is out): its requests skip it as if its circuit were open.
        ``ValueError`` for a bad index."""

    def report(
        self,
        index: int,
        outcome_kind: _Outcome,
        latency_ms: float,
        retry_after_ms: int | None = None,
        sender: int = 0,
    ) -> int | None:
        """Reports the end of an attempt started with ``begin``.

        ``retry_after_ms`` (from ``Retry-After``) applies to ``"rate_limited"``. ``sender``
        (a u64; 0: unknown) says whose request it was: the virtual key's team, else the key,
        hashed. A failure streak or error rate (or a failed half-open probe) that is one
        sender's alone while other senders were seen lately ejects the deployment for that
        sender only; the sender is returned then (else ``None``).
        ``ValueError`` for a bad index or an unknown outcome.
        """

    def hold_for_limit(self, index: int, ms: int) -> None:
        """Keeps selection off deployment ``index`` for ``ms``: the provider limit edgeroute
        counts for it has no request left. Not an attempt: health shows no failure, and the
        in-flight count is unchanged. ``ValueError`` for a bad index."""

    def end_limit_hold(self, index: int) -> None:
        """Ends deployment ``index``'s ``hold_for_limit`` at once (the take that drained the
        limit was given back); an upstream's cool-down (``Retry-After``) and the circuit stay.
        ``ValueError`` for a bad index."""

    def try_retry(self, route: str) -> bool:
        """Takes one retry from the retry budget of ``route`` (funded by ``fund_budgets`` of that
        route alone); ``False``: do not retry (and for an unknown route)."""

    def try_hedge(self, route: str) -> bool:
        """Takes one hedge from the hedge budget of ``route``; call when the hedge
        timer fires. ``False`` for a route without hedging."""

    def set_probe_result(self, index: int, healthy: bool, eject_ms: int) -> None:
        """Applies an active health check: restores deployment ``index``, or
        ejects it for ``eject_ms``. ``ValueError`` for a bad index."""

    def report_broken_stream(self, index: int, sender: int = 0) -> int | None:
        """A stream of ``sender`` on deployment ``index`` that was reported a success at its
        first content broke later: count it as a failure (not in flight, not a new request).
        Returns the sender ejected alone as ``report`` does."""

    def report_lost_race(self, index: int, elapsed_ms: float, answering: bool, sender: int = 0) -> int | None:
        """Reports, instead of ``report``, the end of an attempt on deployment ``index`` cancelled
        after ``elapsed_ms`` because another attempt of its request answered first (a hedge race);
        ``answering``: its response head had come. The wait lifts its peak-EWMA latency; a loser
        with no head that waited three times its answers' latency (or never answered) is a hang:
        from the third such in a row with no answer between, each is a timeout for the circuit,
        else no failure. Returns the sender ejected alone as ``report`` does. ``ValueError`` for
        a bad index."""

    def fund_budgets(self, route: str) -> None:
        """Funds ``route``'s own retry and hedge budgets with one request sent on to its
        deployments (call once per dispatch; refusals, cache hits and explanations fund
        nothing). A route without hedging or with one deployment funds no hedge; an unknown
        route funds nothing."""

    def serving_well(self, index: int) -> bool:
        """Whether deployment ``index`` serves this process's traffic well now: enough recent
        requests, failing at under half the failure rate. ``ValueError`` for a bad index."""

    def health(self, index: int) -> _Health:
        """Health of deployment ``index`` now. ``ValueError`` for a bad index."""

    def deployment_names(self) -> list[str]:
        """Deployment names, by index (as used in ``Decision.order``)."""

    def model_names(self) -> list[str]:
        """Public model names, in config order."""

    @staticmethod
    def count_tokens(text: str, encoding: str) -> int:
        """Tokens in ``text`` under ``encoding`` (one of ``o200k_base``,
        ``cl100k_base``, identical to tiktoken's ``encode_ordinary`` on text without a
        run of letters over 4 KiB, which is merged 4 KiB at a time, a token a byte past
        256 KiB of such runs; or the estimates ``claude_estimate``,
        ``gemini_estimate``). Releases the GIL.

        Raises :class:`BadRequestError` for an unknown encoding.
        """
    @staticmethod
    def nesting_over(body: bytes, limit: int) -> bool:
        """Whether the JSON in ``body`` nests arrays and objects more than ``limit``
        deep: a byte scan that skips strings, no parse. Releases the GIL."""
    @staticmethod
    def duplicate_key(body: bytes) -> str | None:
        """The path (``messages[1].content[0].file.file_id``) of the first key the JSON in
        ``body`` repeats within one object, escapes decoded; None when none is. A byte
        scan that skips strings, no parse. Releases the GIL for a long body."""
    @staticmethod
    def body_faults(body: bytes, limit: int) -> tuple[bool, str | None]:
        """``(nesting_over(body, limit), None)`` when it nests too deep, else ``(False,
        duplicate_key(body))``. A body found clean is remembered (bounded; compared whole),
        so the same bytes sent again are not scanned again. Releases the GIL for a long body."""
