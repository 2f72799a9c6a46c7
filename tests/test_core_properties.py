"""Properties of the binding (``edgeroute._core``) that Python code relies on.

The core's own guarantees are property-tested in Rust
(``rust/edgeroute-core/tests/properties.rs``); these check that they survive the
crossing: ``body_for`` keeps every field but ``model``, errors arrive as the
documented exception classes, and ``prompt_tokens=`` skips counting.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute._core import (
    BadRequestError,
    ConfigError,
    ContextLengthError,
    EdgerouteError,
    ForbiddenError,
    Router,
    UnknownModelError,
)

SPEC = {
    "deployments": [
        {"name": "a", "provider": "openai", "model": "gpt-4o-mini", "weight": 2},
        {"name": "b", "provider": "azure", "model": "gpt-4o-mini-2024-07-18", "context_window": 50},
    ],
    "models": [{"name": "small", "deployments": ["a", "b"]}],
    "rules": [{"name": "no-secrets", "when": {"keywords": ["top secret"]}, "then": {"reject": "refused"}}],
}
ROUTER = Router(json.dumps(SPEC).encode())

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text())
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("model", "messages")), json_values, max_size=4
    ),
    content=st.text(),
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_body_for_replaces_only_the_model(
    extra: dict[str, Any], content: str, ensure_ascii: bool, indent: int | None
) -> None:
    original = {**extra, "model": "small", "messages": [{"role": "user", "content": content}]}
    body = json.dumps(original, ensure_ascii=ensure_ascii, indent=indent).encode()
    try:
        d = ROUTER.decide(body)
    except BadRequestError:
        return  # e.g. extra holds a `stream` that is not a bool: the core refuses it
    for index in d.order:
        out = json.loads(ROUTER.body_for(body, d, index))
        assert out.pop("model") == SPEC["deployments"][index]["model"]  # type: ignore[index]
        assert out == {k: v for k, v in original.items() if k != "model"}


def test_errors_map_onto_the_hierarchy() -> None:
    cases: list[tuple[bytes, type[EdgerouteError]]] = [
        (b"", BadRequestError),
        (b'{"model": "small"}', BadRequestError),
        (b'{"model": "huge", "messages": [{"role": "user", "content": "x"}]}', UnknownModelError),
        (b'{"model": "small", "messages": [{"role": "user", "content": "Top Secret plans"}]}', ForbiddenError),
    ]
    for body, error in cases:
        with pytest.raises(error):
            ROUTER.decide(body)
    with pytest.raises(ConfigError):
        Router(b'{"deployments": [], "models": [{"name": "m", "deployments": ["x"]}]}')
    # `b`'s context window is too small; `a` is the only one left.
    long = json.dumps({"model": "small", "messages": [{"role": "user", "content": "word " * 100}]}).encode()
    assert [ROUTER.deployment_names()[i] for i in ROUTER.decide(long).order] == ["a"]
    # Excluding `a` by its provider leaves nothing that fits: the client's error (400), not an
    # outage (503, which SDKs retry), and it names the largest window the request may use.
    spec = dict(SPEC, rules=[{"name": "not-openai", "then": {"exclude_tags": ["provider:openai"]}}])
    with pytest.raises(ContextLengthError, match="maximum context length is 50 tokens"):
        Router(json.dumps(spec).encode()).decide(long)


@given(n=st.integers(min_value=0, max_value=2**32 - 1))
def test_given_prompt_tokens_are_used(n: int) -> None:
    body = b'{"model": "small", "messages": [{"role": "user", "content": "hello world"}]}'
    exact = ROUTER.decide(body, exact_tokens=True)
    assert exact.prompt_tokens == 9 and exact.tokens_exact
    assert ROUTER.count_prompt(body) == 9
    given = ROUTER.decide(body, prompt_tokens=n)
    assert given.prompt_tokens == n and given.tokens_exact


def test_tokens_are_estimated_unless_routing_needs_them() -> None:
    spec = {
        "deployments": [{"name": "a", "provider": "p", "model": "gpt-4o", "context_window": 100}],
        "models": [{"name": "m", "deployments": ["a"]}],
    }
    router = Router(json.dumps(spec).encode())
    short = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello world"}]}).encode()
    d = router.decide(short)
    # Far from the 100-token window: no tokenizer run, a 4-bytes-a-token estimate.
    assert not d.tokens_exact and d.prompt_tokens > 0
    near = json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 30}]}).encode()
    d = router.decide(near)
    # Within reach of the window: counted exactly (and it fits).
    assert d.tokens_exact and d.prompt_tokens == router.count_prompt(near) and d.order == [0]
