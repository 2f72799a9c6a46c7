"""What each request cost and how it went: records built on the request path,
handed to a recorder that stores them off the hot path.

`record()` is synchronous and cheap (an append), so that it can run in a `finally`
even when the client has gone: spend is never left unrecorded.

Cost: every attempt gets one (`AttemptRecord.cost_usd`: the upstream's usage at the
deployment's price and time-of-day window; the prompt alone, estimated, for an attempt
sent and then given up on: a hedge that lost, a client that left, a timeout; for one that
failed after a 200, the prompt and what was received, `cost.received`; 0 for an attempt the
upstream refused or never received, or answered 200 with its error object). A JSON answer
carries the request's cost in `x-edgeroute-cost-usd`; a stream cannot, because its
headers leave before the usage is known, so its cost is in the record (and the ledger)
only. When a stream carries no usage, the completion is counted by the core's tokenizer
from the streamed text (`Usage.estimated`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from edgeroute import _core
from edgeroute.config import Price
from edgeroute.cost.prices import cache_write_1h_price, multiplier_at
from edgeroute.telemetry.trace_context import TraceContext

# What the reports call the route of a request no route served (an unknown model, a body that
# is not JSON): the ledger keeps its route empty and the request log the model the client sent.
UNROUTED = "(unrouted)"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    estimated: bool = False  # counted by the core because the upstream reported none
    cache_write_tokens: int = 0  # prompt tokens written to a prompt cache (Anthropic, Bedrock), priced apart
    # Audio among the prompt's and the completion's tokens (OpenAI's `*_tokens_details.audio_tokens`),
    # priced at the audio prices where the deployment has them.
    audio_prompt_tokens: int = 0
    audio_completion_tokens: int = 0
    # Calls of built-in tools the upstream ran and bills apart (web_search: 2), priced at the
    # deployment's `price.tool_calls`.
    tool_calls: dict[str, int] = field(default_factory=dict)
    # Of `cache_write_tokens`, those written to Anthropic's 1-hour cache, billed at 2x input (not 1.25x).
    cache_write_1h_tokens: int = 0

    @classmethod
    def from_openai(cls, u: dict[str, Any] | None, *, answered: bool = False, prompted: bool = True) -> Usage | None:
        """Usage from an OpenAI-format `usage` object; None when it is absent or unreadable
        (then the caller counts the tokens itself rather than trusting garbage). With
        `answered` (a text answer; an embedding has no completion), also when it counts the
        prompt but not the completion and no `total_tokens` gives it: read as 0, a careless
        upstream's long answer was priced as its prompt alone. With `prompted` (the request
        has a prompt: only a completions prompt of "" has none), also when it counts no prompt
        tokens: taken as said, a careless upstream's usage of zeros was priced at nothing."""
        if not isinstance(u, dict):
            return None
        completion = u.get("completion_tokens")
        if completion is None and answered:
            total, prompt = u.get("total_tokens"), u.get("prompt_tokens")
            if type(total) is not int or type(prompt) is not int or total < prompt:
                return None
            completion = total - prompt
        details = u.get("prompt_tokens_details") or {}
        prompt = u.get("prompt_tokens")
        if prompt is None:
            # Without its prompt count a usage is whole only with a total to take it from: read
            # as 0, a careless upstream's 13,500-token prompt was priced at nothing.
            total = u.get("total_tokens")
            if type(total) is not int or not (completion is None or type(completion) is int):
                return None
            if total < (completion or 0):
                return None
            prompt = total - (completion or 0)
        # A count is an integer: `true` (Python's 1), `0.5` (cut to 0) or `"7"` is a careless
        # upstream's garbage, counted as a stream's is, never read as a number of tokens.
        # (Two tests, not `all()` over a generator: this runs once an answer, on the event loop.)
        if (prompt is not None and type(prompt) is not int) or (completion is not None and type(completion) is not int):
            return None
        if prompted and not prompt:
            return None
        try:
            out = cls(
                prompt or 0,
                completion or 0,
                int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
            )
        except (TypeError, ValueError, OverflowError):
            return None
        if not 0 <= out.prompt_tokens < 1 << 40 or not 0 <= out.completion_tokens < 1 << 40:
            return None
        # Clamped by comparisons: `min(max(...))` cost ~8,000 instructions a usage, on the event loop.
        prompt, cached = out.prompt_tokens, out.cached_tokens  # prompt: 0 <= prompt < 2**40, checked
        out.cached_tokens = cached = 0 if cached < 0 else cached if cached <= prompt else prompt
        try:  # OpenAI's field, or LiteLLM's name for it
            written = int(details.get("cache_write_tokens") or u.get("cache_creation_input_tokens") or 0)
        except (TypeError, ValueError, OverflowError, AttributeError):
            written = 0
        room = prompt - cached
        out.cache_write_tokens = written = 0 if written < 0 else written if written <= room else room
        if isinstance(details, dict) and details.get(CACHE_WRITE_1H):
            out.cache_write_1h_tokens = _part(details[CACHE_WRITE_1H], written)
        if isinstance(details, dict) and details.get("audio_tokens"):
            out.audio_prompt_tokens = _part(details["audio_tokens"], out.prompt_tokens)
        said = u.get("completion_tokens_details")
        if isinstance(said, dict) and said.get("audio_tokens"):
            out.audio_completion_tokens = _part(said["audio_tokens"], out.completion_tokens)
        if isinstance(tools := u.get(TOOL_CALLS), dict):
            out.tool_calls = {k: v for k, v in tools.items() if type(v) is int and 0 < v < MAX_TOOL_CALLS}
        return out


# `prompt_tokens_details`' count of the cache writes made to Anthropic's 1-hour cache (of `cache_write_tokens`).
CACHE_WRITE_1H = "cache_write_1h_tokens"

# The key under which an answer reader carries its tool calls in the chat-shaped usage it hands
# to accounting (`Usage.from_openai`); never in a usage a client sees.
TOOL_CALLS = "edgeroute_tool_calls"

# More calls of a built-in tool than one answer can run: a count past it is an upstream's garbage.
MAX_TOOL_CALLS = 1 << 20

# Anthropic's server tools billed per call (`usage.server_tool_use.{kind}_requests`).
ANTHROPIC_SERVER_TOOLS = ("web_search", "web_fetch")

# Responses output items of the built-in tools billed per call.
RESPONSES_TOOL_ITEMS = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",  # billed per image, outside the response's usage
}


def responses_tool_calls(output: Any) -> dict[str, int]:
    """The billed tool calls among a Response's `output` items. A code interpreter is billed by
    the container (each may run many calls): its calls count once per `container_id`."""
    out: dict[str, int] = {}
    containers: set[Any] = set()
    for item in output if isinstance(output, list) else ():
        kind = RESPONSES_TOOL_ITEMS.get(str(item.get("type"))) if isinstance(item, dict) else None
        if kind is None:
            continue
        if kind == "code_interpreter":
            container = item.get("container_id")
            if container is not None and container in containers:
                continue
            containers.add(container)
        out[kind] = out.get(kind, 0) + 1
    return out


def anthropic_tool_calls(usage: Any, seen: dict[str, int]) -> dict[str, int]:
    """Anthropic's server tool calls (`usage.server_tool_use`: web_search_requests, web_fetch_requests).
    A count that is not an integer one answer can run (past `MAX_TOOL_CALLS`, negative, a string,
    a fraction, missing) is garbage, and that tool's calls are those the answer showed (`seen`:
    its `server_tool_use` blocks): taken as written, 3,000,000,000 searches booked $30M."""
    used = usage.get("server_tool_use") if isinstance(usage, dict) else None
    used = used if isinstance(used, dict) else {}
    out = {}
    for kind in ANTHROPIC_SERVER_TOOLS:
        count = used.get(f"{kind}_requests")
        count = count if type(count) is int and 0 <= count < MAX_TOOL_CALLS else seen.get(kind, 0)
        if count > 0:
            out[kind] = count
    return out


def anthropic_server_tools(content: Any) -> dict[str, int]:
    """The server tool calls an Anthropic answer's `content` shows (its `server_tool_use` blocks)."""
    seen: dict[str, int] = {}
    for block in content if isinstance(content, list) else ():
        count_server_tool(block, seen)
    return seen


def count_server_tool(block: Any, seen: dict[str, int]) -> None:
    """Adds to `seen` the call of Anthropic's web search or fetch that `block` is, if it is one."""
    if isinstance(block, dict) and block.get("type") == "server_tool_use":
        kind = block.get("name")
        if kind in ANTHROPIC_SERVER_TOOLS:
            seen[kind] = seen.get(kind, 0) + 1


def with_tool_calls(usage: dict[str, Any] | None, calls: dict[str, int]) -> dict[str, Any] | None:
    """A chat-shaped usage for accounting with `calls` added (as it is when there are none)."""
    return {**usage, TOOL_CALLS: calls} if usage is not None and calls else usage


def _part(count: Any, whole: int) -> int:
    """A detail's count of `whole` (audio tokens): an integer within it, else none (garbage)."""
    return min(max(0, count), whole) if type(count) is int else 0


def cost_of(price: Price, usage: Usage, at: float | None = None) -> float:
    """USD for `usage` at `price`: cached prompt tokens at the cached price and cache writes at the
    cache-write price when these are set, plus the per-request price and each built-in tool call
    at its price (`price.tool_calls`), all times the multiplier of the
    price window in force at unix time `at` (now)."""
    cached_price = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    write_price = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
    hour = usage.cache_write_1h_tokens
    fresh = usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
    fresh = fresh if fresh > 0 else 0  # max(0, fresh), without builtin max's ~4,000 instructions
    base = (
        fresh * price.input_per_mtok
        + usage.cached_tokens * cached_price
        + (usage.cache_write_tokens - hour) * write_price
        + (hour * cache_write_1h_price(price) if hour else 0.0)
        + usage.completion_tokens * price.output_per_mtok
    ) / 1e6 + price.per_request
    if usage.tool_calls and price.tool_calls:
        base += sum(each * usage.tool_calls.get(kind, 0) for kind, each in price.tool_calls.items())
    if usage.audio_prompt_tokens or usage.audio_completion_tokens:
        base += _audio_extra(price, usage, fresh) / 1e6
    return base * multiplier_at(price, at) if price.windows else base


def _audio_extra(price: Price, usage: Usage, fresh: int) -> float:
    """What audio tokens cost above the text prices they were counted at (USD x 1e6): the audio
    among the prompt's fresh tokens (a cached one keeps the cached price) and the completion's."""
    extra = 0.0
    if price.audio_input_per_mtok is not None:
        extra += min(usage.audio_prompt_tokens, fresh) * (price.audio_input_per_mtok - price.input_per_mtok)
    if price.audio_output_per_mtok is not None:
        extra += usage.audio_completion_tokens * (price.audio_output_per_mtok - price.output_per_mtok)
    return extra


def _visible_text(part: Any, out: list[str]) -> None:
    """Appends what the model wrote in a message or a stream delta: content, refusal, tool calls."""
    if not isinstance(part, dict):
        return
    for k in ("content", "refusal"):
        if isinstance(part.get(k), str):
            out.append(part[k])
    for tc in part.get("tool_calls") or ():
        fn = tc.get("function") or {} if isinstance(tc, dict) else {}
        for k in ("name", "arguments"):
            if isinstance(fn.get(k), str):
                out.append(fn[k])


def counted_usage(prompt_tokens: int, parts: list[str], encoding: str) -> Usage:
    """Usage with the completion counted from the text the model wrote (`parts`), estimated."""
    text = "".join(parts)
    completion = _core.Router.count_tokens(text, encoding) if text else 0
    return Usage(prompt_tokens, completion, 0, estimated=True)


def stream_text(sse_bytes: bytes) -> str:
    """What the model wrote in a stream (content, refusals, tool calls), joined: OpenAI's
    chunks, or Responses or Anthropic events relayed as they are."""
    return "".join(stream_parts(sse_bytes))


def json_object(data: bytes) -> dict[str, Any] | None:
    """`data` as a JSON object; None when it is not JSON, or not an object."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def stream_objects(sse_bytes: bytes) -> Iterator[dict[str, Any]]:
    """The JSON object of each `data:` line in `sse_bytes` (whole lines: a line cut short, or
    one that is not an object, is skipped)."""
    for line in sse_bytes.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data and data != b"[DONE]" and (obj := json_object(data)) is not None:
            yield obj


def stream_parts(sse_bytes: bytes) -> list[str]:
    """The text of each `data:` line in `sse_bytes` (whole lines: a line cut short is skipped)."""
    parts: list[str] = []
    for obj in stream_objects(sse_bytes):
        for choice in obj.get("choices") or ():
            _visible_text(choice.get("delta") if isinstance(choice, dict) else None, parts)
            if isinstance(choice, dict) and isinstance(choice.get("text"), str):
                parts.append(choice["text"])  # a legacy text completion's chunk
        # Streams relayed in their own format (Responses, Anthropic Messages): their text is in
        # their own events; read as none, a stream cut mid-way was priced as its prompt alone.
        kind = obj.get("type")
        if kind in _RESPONSES_DELTAS and isinstance(obj.get("delta"), str):
            parts.append(obj["delta"])
        elif kind == "content_block_delta" and isinstance(delta := obj.get("delta"), dict):
            for k in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(k), str):
                    parts.append(delta[k])
    return parts


# Responses stream events whose `delta` is text the model wrote (not audio's base64).
_RESPONSES_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)


def answer_text(answer: dict[str, Any]) -> str:
    """What a (non-stream) chat answer's messages say (content, refusals, tool calls), joined."""
    parts: list[str] = []
    for choice in answer.get("choices") or ():
        _visible_text(choice.get("message") if isinstance(choice, dict) else None, parts)
    return "".join(parts)


def estimate_answer_usage(prompt_tokens: int, answer: dict[str, Any], encoding: str) -> Usage:
    """Usage for a (non-stream) answer that carried none, counted from its messages."""
    parts: list[str] = []
    for choice in answer.get("choices") or ():
        _visible_text(choice.get("message") if isinstance(choice, dict) else None, parts)
    return counted_usage(prompt_tokens, parts, encoding)


# A request's error class when its upstream answered past the request's `max_tokens` (its status
# stays 200: a stream is ended at edgeroute's limit, `dispatch.output_cap`; a whole answer charged).
OVERRAN = "upstream_overran_max_tokens"


@dataclass(slots=True)
class AttemptRecord:
    deployment: str
    provider: str
    outcome: str  # an edgeroute.outcome.Outcome value, or "pending" / "cancelled"
    status: int | None
    latency_ms: float
    hedge: bool = False
    error: str | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    started_at: float = 0.0  # time.time() when the attempt began
    ttft_ms: float | None = None  # to the first content event (streams only)
    kind: str = "first"  # first | retry (the route's own deployments) | fallback (another model's) | hedge
    span_id: int = 0  # the attempt's trace span, when the request is traced (its traceparent upstream)


def billed_usage(attempts: list[AttemptRecord]) -> Usage | None:
    """The tokens of a request that no attempt answered, as its attempts were billed (given up
    on, or failed after a 200: `cost.received`), summed; None when none was."""
    billed = [a.usage for a in attempts if a.usage is not None]
    if not billed:
        return None
    return Usage(
        sum(u.prompt_tokens for u in billed),
        sum(u.completion_tokens for u in billed),
        sum(u.cached_tokens for u in billed),
        any(u.estimated for u in billed),
        sum(u.cache_write_tokens for u in billed),
        sum(u.audio_prompt_tokens for u in billed),
        sum(u.audio_completion_tokens for u in billed),
        {k: sum(u.tool_calls.get(k, 0) for u in billed) for k in {k for u in billed for k in u.tool_calls}},
        sum(u.cache_write_1h_tokens for u in billed),
    )


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    started: float
    model: str
    route: str = ""
    rule: str | None = None
    task: str | None = None
    shadow_of: str | None = None  # for a shadow request: the id of the request it mirrors
    stream: bool = False
    key: str | None = None
    team: str | None = None
    user: str | None = None
    status: int = 0
    outcome: str = "pending"
    latency_ms: float = 0.0
    deployment: str | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    attempts: list[AttemptRecord] = field(default_factory=list)
    # Set by admission: which budget refused or downgraded the request, e.g. "blocked:team-monthly".
    admission: str | None = None
    # Why admission did not take a budget's action (a downgrade whose model the prompt exceeds):
    # added to `x-edgeroute-explain` and to the request log's detail.
    admission_note: str | None = None
    started_at: float = 0.0  # time.time() at arrival; the shared name for `started` (set from it)
    correlation_id: str | None = None  # the client's own x-request-id, never used as our id
    ttft_ms: float | None = None  # arrival to the first content byte sent (streams only)
    # Why the request failed: the last attempt's outcome for an upstream failure (see
    # dispatch.outcome), a stream's cut reason, or the proxy's error code; None when answered.
    error_class: str | None = None
    queue_ms: float = 0.0  # time spent waiting for capacity before the first attempt
    # Deployments passed over before any call because they cannot read the request: (name, why).
    skipped: list[tuple[str, str]] | None = None
    priority: str | None = None  # the priority class it was served in (edgeroute.config.priority)
    # For the request log: the explanation and the core's predictions.
    tags: list[str] | None = None
    reasons: list[str] = field(default_factory=list)
    policy: str | None = None
    variant: str | None = None
    difficulty: float | None = None
    # Set only where the request log keeps content (`log_content`): the request body and the
    # answer as sent, and how to keep them; the writer redacts them, off the request path.
    content_mode: str = "none"
    content_request: bytes | None = None
    content_response: bytes | None = None
    cache: str | None = None  # hit | miss | stale | bypass, where the route caches
    saved_usd: float = 0.0  # what a cached answer would have cost upstream
    cache_writer: str | None = None  # a hit's: the id of the request whose answer it served
    trace: TraceContext | None = None  # set only when tracing is on (edgeroute.telemetry.tracing)
    # Its settlement waits for Redis to say whether another instance recorded it as crashed
    # (`cost.control.liveness`): the ledger takes it from there, or never.
    held_back: bool = False

    def __post_init__(self) -> None:
        if not self.started_at:
            self.started_at = self.started

    def to_json(self) -> bytes:
        """The record's fields as JSON (never the prompt or the answer content)."""
        out = asdict(self)
        out.pop("content_request", None)
        out.pop("content_response", None)
        return orjson.dumps(out)


class Recorder(Protocol):
    def record(self, rec: RequestRecord) -> None: ...


class MemoryRecorder:
    """Keeps the most recent records in memory (the embedded default)."""

    def __init__(self, keep: int = 10_000) -> None:
        self.records: collections.deque[RequestRecord] = collections.deque(maxlen=keep)
        self.total_cost = 0.0
        self.count = 0

    def record(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        self.total_cost += rec.cost_usd
        self.count += 1


def now() -> float:
    return time.time()
