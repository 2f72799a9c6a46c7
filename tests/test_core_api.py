"""The binding's module-level API that other parts of the server build on:
``redact_pii`` (redacted logs and stored content) and ``OUTCOMES`` (the one
attempt-outcome vocabulary)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute._core import OUTCOMES, Router, redact_pii
from edgeroute.outcome import Outcome

SAMPLES = {
    "email": "jane.doe@example.co.uk",
    "phone": "+1 415-555-0132",
    "payment_card": "4111 1111 1111 1111",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "national_id": "123-45-6789",
}


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_each_kind_becomes_its_typed_marker(kind: str) -> None:
    assert redact_pii(f"before {SAMPLES[kind]} after") == f"before [PII:{kind}] after"


def test_text_without_pii_is_unchanged_and_lookalikes_stay() -> None:
    text = "Order 4111 1111 1111 1112 shipped in 2024; IBAN-like GB82 WEST 1234 5698 7654 33. 東京 🚀"
    assert redact_pii(text) == text
    assert redact_pii("") == ""


def test_a_number_just_before_a_card_does_not_hide_it() -> None:
    assert redact_pii("paid in 2024 4111 1111 1111 1111") == "paid in 2024 [PII:payment_card]"


def test_every_occurrence_is_replaced() -> None:
    text = "a@b.io, c@d.io; cards 4111111111111111 and 5500 0000 0000 0004"
    assert redact_pii(text) == "[PII:email], [PII:email]; cards [PII:payment_card] and [PII:payment_card]"


words = st.sampled_from(["hello", "the", "2024", "order", "#12", "é", "東京", "🚀", "\n", "-", "x_y"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(words, st.sampled_from(sorted(SAMPLES))), max_size=20))
def test_no_sample_survives_redaction(tokens: list[str]) -> None:
    text = " ; ".join(SAMPLES.get(t, t) for t in tokens)
    out = redact_pii(text)
    for kind, sample in SAMPLES.items():
        assert sample not in out
        assert out.count(f"[PII:{kind}]") == tokens.count(kind)


def test_outcomes_are_one_vocabulary_with_the_error_classes() -> None:
    assert len(set(OUTCOMES)) == len(OUTCOMES)
    assert OUTCOMES[0] == "success"
    # The server's Outcome enum is the core's list: one vocabulary, no translation table.
    assert [o.value for o in Outcome] == list(OUTCOMES)


def test_report_takes_every_outcome_and_only_those() -> None:
    spec = {
        "deployments": [{"name": "a", "provider": "openai", "model": "m"}],
        "models": [{"name": "m", "deployments": ["a"]}],
    }
    router = Router(json.dumps(spec).encode())
    for name in OUTCOMES:
        router.begin(0)
        router.report(0, name, 1.0, 10)
    with pytest.raises(ValueError, match="unknown outcome"):
        router.report(0, "rate_limit", 1.0)  # type: ignore[arg-type]
    # Request-caused outcomes do not count as failures; auth, 5xx, timeouts, resets and 429 do.
    assert router.health(0)["failures"] == 5


def test_a_decision_makes_each_string_once_and_hands_out_fresh_lists() -> None:
    spec = {
        "deployments": [
            {"name": "a", "provider": "openai", "model": "m"},
            {"name": "b", "provider": "openai", "model": "m"},
        ],
        "models": [{"name": "m", "deployments": ["a"]}, {"name": "big", "deployments": ["b"]}],
        "rules": [{"name": "long", "when": {"keywords": ["contract"]}, "then": {"route": "big"}}],
    }
    body = {"model": "m", "messages": [{"role": "user", "content": "review this contract"}]}
    d = Router(json.dumps(spec).encode()).decide(json.dumps(body).encode())
    assert (d.model, d.route, d.rule, d.encoding) == ("m", "big", "long", "o200k_base")
    # The handlers read these many times a request: later reads share the first read's string.
    for name in ("model", "route", "rule", "encoding"):
        assert getattr(d, name) is getattr(d, name), name
    first, second = d.reasons, d.reasons
    assert first == second and first and first[0] is second[0]
    first.append("changed by a caller")  # each read is the caller's own list
    assert d.reasons == second
    assert (d.task, d.policy, d.variant) == (None, None, None)
    with pytest.raises(AttributeError):
        d.route = "elsewhere"  # type: ignore[misc]
