"""Usage an upstream under-reports: completion tokens fewer than its answer's text can be.

edgeroute charges an answer at the provider's own count. A careless or dishonest upstream (an
`openai_compatible` server, a relay) that answered 24 KB of text ("hello world " x 2,000,
about 4,000 tokens) reporting `completion_tokens: 5` was charged 270 times less, and no budget
held it. No tokenizer packs more than `MAX_BYTES_PER_TOKEN` bytes of UTF-8 into one token, so
a text longer than that many bytes a reported token (plus `SLACK_BYTES`) proves the count
wrong. Then the text is counted (the core's tokenizer, tens of microseconds a thousand
tokens) and the answer is charged the larger count, flagged estimated, with a reason for the
log and a metric.

The normal case costs a comparison of lengths (a `str`'s length is at most its UTF-8 length,
so the text is encoded only when its characters alone do not settle it).

Used where a chat answer is settled: a JSON answer's visible text (`dispatch.attempt`), a
stream's joined deltas (`dispatch.relay`, read only when its events are long for the count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from edgeroute import _core
from edgeroute.accounting import Usage

# The most UTF-8 bytes one token of any tokenizer edgeroute counts with holds: o200k_base and
# cl100k_base have tokens of up to 128 spaces (a text of spaces counts 126.6 bytes a token;
# "=" or "-" runs 64), the Claude and Gemini estimates fewer (110, 121). Below it, an honest
# answer of spaces would be counted for nothing, and charged an upstream tokenizer's count
# below ours at ours.
MAX_BYTES_PER_TOKEN = 128
# Bytes a reported count may be short by before it is called impossible: a chunk of text the
# upstream counted under a token boundary, a stop sequence's trailing bytes.
SLACK_BYTES = 256
# Bytes a token when only the answer's length is known: the core's own estimate of a text.
ESTIMATE_BYTES_PER_TOKEN = 4
CODE = "upstream_underreported_usage"  # the error_class / metric label of a corrected usage


@dataclass(frozen=True, slots=True)
class Corrected:
    """The usage to charge in place of an impossible one, and why."""

    usage: Usage  # the reported usage with `completion_tokens` = max(reported, counted), estimated
    reported: int  # completion tokens the upstream reported
    counted: int  # completion tokens counted from the text (estimated from its length when only that was given)
    text_bytes: int
    reason: str
    code: str = CODE


def impossible(completion_tokens: int, text_bytes: int) -> bool:
    """Whether `text_bytes` of answer cannot be `completion_tokens` tokens of any tokenizer."""
    return text_bytes > completion_tokens * MAX_BYTES_PER_TOKEN + SLACK_BYTES


def check(usage: Usage, text: str | bytes | int, encoding: str) -> Corrected | None:
    """None when `usage`'s completion count can be the answer's (the normal case: a length
    comparison); else the usage to charge. `text`: what the model wrote (a `str` or its UTF-8
    bytes: counted with the core's tokenizer for `encoding`), or only its length in bytes
    (estimated at `ESTIMATE_BYTES_PER_TOKEN` bytes a token)."""
    reported = usage.completion_tokens
    bound = reported * MAX_BYTES_PER_TOKEN + SLACK_BYTES
    if isinstance(text, int):
        size = text
    elif len(text) <= bound // 4 or (isinstance(text, bytes) and len(text) <= bound):
        return None  # short enough whatever its characters' widths: nothing more to look at
    else:
        size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size <= bound:
        return None
    counted = _count(text, size, encoding)
    if counted <= reported:  # a tokenizer of longer tokens than ours: the report stands
        return None
    how = "counted" if not isinstance(text, int) else f"estimated at {ESTIMATE_BYTES_PER_TOKEN} bytes a token"
    reason = (
        f"the upstream reported {reported:,} completion tokens for {size:,} bytes of answer (no token holds more "
        f"than {MAX_BYTES_PER_TOKEN} bytes): charged at {counted:,} tokens, {how}"
    )
    fixed = dataclasses.replace(usage, completion_tokens=counted, estimated=True)
    return Corrected(fixed, reported, counted, size, reason)


def _count(text: str | bytes | int, size: int, encoding: str) -> int:
    if isinstance(text, int):
        return math.ceil(size / ESTIMATE_BYTES_PER_TOKEN)
    s = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return int(_core.Router.count_tokens(s, encoding))
