"""An upstream's completion count that its answer's text proves impossible is replaced by a count.

Red team B's case: 24 KB of answer ("hello world " x 2,000, about 4,000 tokens) reported as
5 completion tokens, charged about 270 times less than its text. `cost.underreport.check`
finds such a count by the answer's length (no token holds more than 128 bytes) and counts the
text with the core's tokenizer; an honest count, even of text made of the longest tokens there
are (runs of spaces), is left alone without counting anything. Real tokenizer counts.
"""

from __future__ import annotations

from typing import Any

import pytest

from edgeroute import _core
from edgeroute.accounting import Usage, cost_of
from edgeroute.config import Price
from edgeroute.cost import underreport

HELLO = "hello world " * 2000
DOLLAR_A_KTOK = Price(input_per_mtok=1000.0, output_per_mtok=1000.0)  # red team B's price: $0.001 a token


def _said(completion: int) -> Usage:
    return Usage(prompt_tokens=10, completion_tokens=completion)


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base", "claude_estimate"])
def test_an_impossible_count_is_replaced_by_the_texts(encoding: str) -> None:
    exact = _core.Router.count_tokens(HELLO, encoding)
    fix = underreport.check(_said(5), HELLO, encoding)
    assert fix is not None and fix.code == "upstream_underreported_usage"
    assert (fix.reported, fix.counted, fix.text_bytes) == (5, exact, 24_000)
    assert fix.usage.completion_tokens == exact and fix.usage.prompt_tokens == 10 and fix.usage.estimated
    assert "reported 5 completion tokens for 24,000 bytes" in fix.reason
    # At red team B's price: charged about $4 (the text), not $0.015 (the report).
    assert cost_of(DOLLAR_A_KTOK, fix.usage) == pytest.approx((10 + exact) / 1000)
    assert cost_of(DOLLAR_A_KTOK, fix.usage) > 3.9


def test_text_of_many_bytes_a_character_is_counted_too() -> None:
    text = "日本語のテキスト" * 1000  # 24,000 bytes in 8,000 characters
    fix = underreport.check(_said(10), text, "o200k_base")
    assert fix is not None and fix.counted == _core.Router.count_tokens(text, "o200k_base") and fix.text_bytes == 24_000
    as_bytes = underreport.check(_said(10), text.encode(), "o200k_base")
    assert as_bytes is not None and as_bytes.counted == fix.counted


def test_with_only_the_length_the_tokens_are_estimated_from_it() -> None:
    fix = underreport.check(_said(5), 24_000, "o200k_base")
    assert fix is not None and fix.counted == 6000 and fix.usage.estimated and "estimated" in fix.reason
    assert underreport.check(_said(5), 600, "o200k_base") is None  # within 5 tokens' bound and the slack


@pytest.mark.parametrize(
    "text",
    [HELLO, " " * 100_000, "=" * 100_000, "\n" * 50_000, "日本語" * 10_000],
    ids=["words", "spaces", "equals", "newlines", "cjk"],
)
@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_an_honest_count_stands_and_is_not_counted_again(text: str, encoding: str, monkeypatch: Any) -> None:
    honest = _core.Router.count_tokens(text, encoding)  # spaces: 126.6 bytes a token
    monkeypatch.setattr(_core.Router, "count_tokens", _refused)
    assert underreport.check(_said(honest), text, encoding) is None
    assert underreport.check(_said(honest), len(text.encode()), encoding) is None


def test_the_normal_case_is_a_comparison_of_lengths(monkeypatch: Any) -> None:
    """A count that fits the text's characters at 4 bytes each is never encoded nor counted."""
    monkeypatch.setattr(_core.Router, "count_tokens", _refused)
    text = "x" * 100_000  # 12,500 tokens
    assert underreport.check(_said(4000), text, "o200k_base") is None  # 100,000 characters <= (4000 * 128 + 256) / 4
    assert underreport.impossible(5, 24_000) and not underreport.impossible(200, 24_000)


def _refused(*_: object) -> int:
    raise AssertionError("the text was counted")
