"""Usage an upstream over-reports: more tokens than its request could have been billed.

edgeroute charges an answer at the provider's own count. A careless or dishonest upstream that
answered "hello" to a request with `max_tokens: 10` reporting `completion_tokens: 1e9` was
charged $2,000,000 at $2/M, exhausting every budget of its key and team at once; a 9-token prompt
reported as 1e9 prompt tokens the same. `cost.underreport` is the twin for counts too small.

What a real provider can bill is bounded where edgeroute knows the request:

- Output, when the request sets a bound (`max_tokens`, `max_completion_tokens`, Responses'
  `max_output_tokens`; reasoning, Anthropic's thinking and tool calls are inside it): what the
  stream's output cap lets through (`output_cap.output_limit`, twice the bound times `n` and 64
  tokens more, plus an echo's prompts), or more when the answer's text is longer (an upstream
  that ignored the bound and wrote on: its text's UTF-8 bytes, since no token is shorter than a
  byte). A request with a Predicted Output has no such bound (rejected prediction tokens are
  billed beyond `max_tokens`), nor one that names a thinking budget (Anthropic's interleaved
  thinking may think past `max_tokens`, and its full thinking is billed, a summary streamed).
- The prompt, when edgeroute sent the whole of it: the request body's bytes (no token is shorter
  than a byte; the body holds every message, tool definition and cached prefix) and a margin for
  what a provider adds unseen (a tool-use system prompt, a chat template's tokens). Not when the
  request has media parts (their tokens are not their bytes), nor a feature by which the
  provider adds input of its own (a stored conversation, search results, files, containers,
  MCP servers): those stay as reported.

A usage past a bound is charged at the bound, flagged estimated, with a reason for the log.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import orjson

from edgeroute.accounting import Usage

CODE = "upstream_overreported_usage"  # the error_class of a prompt count capped here
# Prompt tokens a provider may add to what it was sent (Anthropic's tool-use system prompt is
# ~350-500 tokens; a chat template a few a message, far below the JSON each message takes).
PROMPT_MARGIN_TOKENS = 4096
# Request fields by which a provider bills input edgeroute never sent: when one is in the
# body (anywhere: a parameter or a tool type), the prompt is not bounded by it.
_INPUT_ADDED_BY_PROVIDER = (
    b"previous_response_id",
    b'"conversation"',
    b"pmpt_",  # a stored prompt template (Responses' `prompt.id`)
    b"web_search",
    b"file_search",
    b"google_search",
    b"search_result",
    b"web_fetch",
    b"url_context",
    b'"mcp',
    b"mcp_server",
    b"container",
    b"code_execution",
    b"code_interpreter",
    b"computer_",
    b"file_id",
    b"cachedcontent",
    b"cached_content",
    b"retrieval",
    b"grounding",
    b"encrypted_content",  # reasoning passed back encrypted: its tokens are not its bytes
    b"redacted_thinking",
    b'"audio"',  # a chat turn naming stored audio by id: read and billed again as input
    b"item_reference",  # a Responses input item by id
    # Media wherever it is (a tool result's image, which the core's count of parts may not reach):
    # its tokens are not its bytes (an image by URL is 1,600 tokens).
    b'"image',
    b"input_audio",
    b"input_file",
    b'"file"',
    b"document",
    b"video",
    b"data_sources",  # Azure OpenAI "On Your Data": retrieved documents billed as prompt
)


# A thinking budget a request names: Anthropic's interleaved thinking may think past `max_tokens`
# (`budget_tokens` is then the whole turn's), billed in full though only a summary is streamed.
_THINKING_BUDGET = re.compile(rb"(?i)budget_tokens|thinking_?budget")


def _plain(body: bytes) -> bytes:
    """The body as JSON with no escapes to hide a word (`"web_\\u0073earch_options"` is the
    upstream's `web_search_options`): read again only when a usage is past a bound (rare)."""
    try:
        return orjson.dumps(orjson.loads(body))
    except orjson.JSONDecodeError:
        return body


def output_bounded(body: bytes) -> bool:
    """Whether a request's output bound holds what it can be billed (not when it names a thinking budget)."""
    return _THINKING_BUDGET.search(_plain(body)) is None


@dataclass(frozen=True, slots=True)
class Capped:
    """The usage to charge in place of an impossible one, and why."""

    usage: Usage
    reason: str
    output: bool  # the output count was capped (else only the prompt's)


def prompt_bound(body: bytes, media_parts: int) -> int | None:
    """The most prompt tokens a request of `body` can be billed, or None when edgeroute cannot
    bound it (media parts, or input the provider adds itself)."""
    if media_parts:
        return None
    low = _plain(body).lower()
    if any(word in low for word in _INPUT_ADDED_BY_PROVIDER):
        return None
    return len(body) + PROMPT_MARGIN_TOKENS


def check(usage: Usage, output_limit: int | None, text_bytes: int, most_prompt: int | None) -> Capped | None:
    """None when `usage` can be what the request was billed; else the usage to charge.
    `output_limit`: the output cap's limit (None: the request sets no bound); `text_bytes`: the
    UTF-8 bytes of the answer's text (or a bound on them, the answer's size)."""
    fixed, why, output = usage, [], False
    most_output = None if output_limit is None else max(output_limit, text_bytes)
    if most_output is not None and usage.completion_tokens > most_output:
        why.append(
            f"{usage.completion_tokens:,} completion tokens for a request bounded at {output_limit:,} and an answer "
            f"of {text_bytes:,} bytes: charged at {most_output:,}"
        )
        audio = min(usage.audio_completion_tokens, most_output)
        fixed = dataclasses.replace(fixed, completion_tokens=most_output, audio_completion_tokens=audio)
        output = True
    reported = max(usage.prompt_tokens, usage.cached_tokens + usage.cache_write_tokens)
    if most_prompt is not None and reported > most_prompt:
        why.append(f"{reported:,} prompt tokens for a request of at most {most_prompt:,}: charged at {most_prompt:,}")
        fixed = dataclasses.replace(
            fixed,
            prompt_tokens=most_prompt,
            cached_tokens=min(usage.cached_tokens, most_prompt),
            cache_write_tokens=min(usage.cache_write_tokens, most_prompt - min(usage.cached_tokens, most_prompt)),
            cache_write_1h_tokens=min(usage.cache_write_1h_tokens, most_prompt),
            audio_prompt_tokens=min(usage.audio_prompt_tokens, most_prompt),
        )
    if fixed is usage:
        return None
    fixed = dataclasses.replace(fixed, estimated=True)
    if fixed.cache_write_1h_tokens > fixed.cache_write_tokens:
        fixed.cache_write_1h_tokens = fixed.cache_write_tokens
    return Capped(fixed, "the upstream reported " + "; ".join(why), output)
