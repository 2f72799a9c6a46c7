"""What an attempt that failed after its upstream answered 200 was likely billed.

The upstream took the prompt and sent (part of) an answer that edgeroute could not deliver:
one over the size bound, malformed JSON, a body of the wrong shape, a stream that broke
before its first content. The provider billed the prompt and what it generated, so the
attempt is priced by what was received: the usage the body reports when it has one, else
the prompt as counted and the output estimated from what arrived (its text counted with the
deployment's tokenizer; a body in which nothing reads, at four bytes a token). A body that
is the provider's error (an `error` member, `type: error`, or none of an answer's members)
without usage was not billed: nothing is charged.

Runs on the failure path only (a worker thread for a large body, see `dispatch.attempt`).
"""

from __future__ import annotations

from typing import Any

from edgeroute import _core
from edgeroute.accounting import Usage, json_object, stream_objects

# The members an answer carries in each format the proxy reads (chat, completions, Messages,
# Responses, Gemini, Bedrock, embeddings, Titan): a JSON object with none of them is no answer.
ANSWER_MEMBERS = ("choices", "content", "output", "candidates", "promptFeedback", "data", "embeddings", "embedding")
# Members whose string values (at any depth) are what the model wrote.
_TEXT_MEMBERS = frozenset(
    {"content", "text", "refusal", "arguments", "partial_json", "thinking", "reasoning_content", "delta"}
)
_MAX_DEPTH = 12
BYTES_PER_TOKEN = 4  # the estimate of a body in which nothing reads


def received_usage(
    prompt_tokens: int, body: bytes, encoding: str, *, stream: bool, most: int | None = None
) -> Usage | None:
    """The usage of an answer received whole as `body` (a JSON body, or a stream's OpenAI-format
    events as held) and not delivered; None when it is the provider's error and not billed.
    `most`: the output tokens the request could have had (an estimate never goes past them)."""
    seen = _stream(body) if stream else _json(body)
    if seen is None:  # nothing in it reads
        return _estimated(prompt_tokens, len(body) // BYTES_PER_TOKEN, most)
    usage, parts, error = seen
    if usage is not None:
        return usage
    if error:
        return None
    text = "".join(parts)
    return _estimated(prompt_tokens, _core.Router.count_tokens(text, encoding) if text else 0, most)


def cut_usage(prompt_tokens: int, size: int, most: int | None = None) -> Usage:
    """The usage of an answer cut short after `size` bytes (not parsed: only its size is kept)."""
    return _estimated(prompt_tokens, size // BYTES_PER_TOKEN, most)


def _estimated(prompt_tokens: int, completion: int, most: int | None) -> Usage:
    return Usage(prompt_tokens, completion if most is None else min(completion, most), estimated=True)


def _json(body: bytes) -> tuple[Usage | None, list[str], bool] | None:
    obj = json_object(body)
    return None if obj is None else _read(obj, not any(k in obj for k in ANSWER_MEMBERS))


def _stream(body: bytes) -> tuple[Usage | None, list[str], bool] | None:
    """The usage, text and whether any event was an error, of the whole `data:` events in a
    stream's head; None when none of its events reads."""
    usage: Usage | None = None
    parts: list[str] = []
    error = read_any = False
    for obj in stream_objects(body):
        read_any = True
        u, text, err = _read(obj, False)
        usage, error = u or usage, error or err
        parts += text
    return (usage, parts, error) if read_any else None


def _read(obj: dict[str, Any], no_answer: bool) -> tuple[Usage | None, list[str], bool]:
    """(the usage `obj` reports, the text in it, whether it is an error) for one object."""
    usage = Usage.from_openai(obj.get("usage"), answered=True)
    error = bool(obj.get("error")) or obj.get("type") == "error" or no_answer
    parts: list[str] = []
    if usage is None and not error:
        _text(obj, parts, 0)
    return usage, parts, error


def _text(value: Any, out: list[str], depth: int, under_text: bool = False) -> None:
    """Appends the strings under text members (`content`, `text`, tool arguments, ...) of any format."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, str):
        if under_text:
            out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _text(v, out, depth + 1, k in _TEXT_MEMBERS)
    elif isinstance(value, list):
        for v in value:
            _text(v, out, depth + 1, under_text)
