"""The semantic lookup's fast paths give exactly what the plain ones give.

The embedder tokenizes piece by remembered piece and the guards work on distinct words and
chunks; both must agree with the straightforward computation on every input, or the
precision figures (measured through the fast paths) would not describe the guards' rules.
"""

from __future__ import annotations

import collections
import hashlib
import re
import unicodedata
from fractions import Fraction

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute.cache import evaluate
from edgeroute.cache import semantic as sem

_PAIRS = [
    t
    for line in evaluate.DEFAULT_PAIRS.read_text().splitlines()
    if line.strip()
    for t in (orjson.loads(line)["a"], orjson.loads(line)["b"])
]
# Characters that matter to the tokenizer's pieces and to the guards: spaces and "▁",
# other whitespace, digits, separators, quotes, backquotes, code punctuation, capitals,
# non-Latin scripts and letters whose lower case changes length.
_WORDS = [" not ", " Paris ", "n't", " the ", " de ", " la ", " es ", " is ", " two ", " unsafe ", " under "]
_ALPHABET = st.sampled_from([*"ab cZ  \t\n\u2581\u00a0,.!?'\"`“”_()-1203éÉİ日本\u041f\u0440Ω", *_WORDS])
_TEXT = st.lists(_ALPHABET, max_size=60).map("".join)


def reference_guards(text: str) -> sem.Guards:
    """The guards in their plain form: every word in order, each pattern over the whole text."""
    words = sem._WORD.findall(text)
    lowered = [w.lower().replace("\u2019", "'") for w in words]
    spelled = {w for w in lowered if w in sem._NUMBER_WORDS}
    numeric = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    found = [sem._number(m) for m in sem._NUMBER.findall(numeric)]
    numbers = frozenset(set(found) | spelled)
    entities: set[str] = set()
    for i, (w, low) in enumerate(zip(words, lowered, strict=True)):
        if len(w) > 1 and ((w[0].isupper() and i > 0 and low not in sem._STOP_INDEX) or w.isupper()):
            entities.add(low.removesuffix("'s"))
    for sentence in re.split(r"[.!?]\s+", text):
        first = sem._WORD.search(sentence)
        opener = first.group(0).lower().replace("\u2019", "'").removesuffix("'s") if first else ""
        if first and len(opener) > 1 and opener[0] != first.group(0)[0] and not sem._is_common(opener):
            entities.add(opener)
    quoted = frozenset(next(g for g in m if g) for m in sem._QUOTED.findall(text))
    code = frozenset(next(g for g in m if g) for m in sem._CODE.findall(text))
    negated = any(w in sem._NEGATIONS or w.endswith("n't") or sem._negating_prefix(w) for w in lowered)
    actions = frozenset(sem._OPPOSED_FORMS[w] for w in set(lowered) if w in sem._OPPOSED_FORMS)
    script, language = reference_language(text, lowered)
    operators = frozenset(sem._OPERATOR.findall(text))
    order: list[str] = [w for w in dict.fromkeys(lowered) if w in entities]
    if len(set(found)) > 1:
        order += ["", *dict.fromkeys(sem._number(m) for m in sem._NUMBER.findall(text))]
    exact = (numbers, frozenset(entities), quoted, code, negated, actions, script, operators, order)
    return sem.seal(exact, language, reference_spans(lowered), reference_shape(lowered))


def reference_shape(lowered: list[str]) -> bytes:
    """The word count, a bit per instruction word present, and the smallest ids of the content
    words' stems."""
    mask = sum(1 << i for i, w in enumerate(sem._INSTRUCTIONS) if w in lowered)
    ids = sorted(
        {
            sem._word_id(sem._stem(w.removesuffix("'s")))
            for w in lowered
            if len(w.removesuffix("'s")) > 1
            and w.removesuffix("'s") not in sem._FILLER | sem._CONNECTORS | sem._NEGATIONS
        }
    )[: sem._SKETCH]
    return sem._SHAPE.pack(len(lowered), mask) + b"".join(i.to_bytes(4, "little") for i in ids)


def reference_spans(lowered: list[str]) -> bytes:
    """Each connector (the first 16 of them, then all of them as one digest) with the content
    words within the window on each side."""
    content = [w for w in lowered if w not in sem._FILLER]
    out = b""
    n = 0
    for i, w in enumerate(content):
        if w in sem._CONNECTORS:
            near = [(x, j) for j, x in enumerate(content) if 0 < abs(j - i) <= sem._WINDOW]
            before = [sem._word_id(x) for x, j in near if j < i and x not in sem._CONNECTORS]
            after = [sem._word_id(x) for x, j in near if j > i and x not in sem._CONNECTORS]
            pad = lambda ids: ids + [0] * (sem._WINDOW - len(ids))  # noqa: E731
            out += sem._SPAN.pack(sem._CONNECTOR_ID[w], *pad(before), *pad(after))
            n += 1
    if n > sem._MAX_SPANS:
        return b"\xff" + hashlib.blake2b(out, digest_size=16).digest()
    return out


def reference_language(text: str, lowered: list[str]) -> tuple[str, str | None]:
    """Every letter's script counted; each word's vote shared exactly among its languages."""
    scripts = collections.Counter(sem._script(ch) for ch in text if ch.isalpha())
    script = scripts.most_common(1)[0][0] if scripts else "none"
    if script != "latin":
        return script, None
    votes: dict[str, Fraction] = collections.defaultdict(Fraction)
    for w in lowered:
        langs = sem._STOP_INDEX.get(w, ())
        for lang in langs:
            votes[lang] += Fraction(1, len(langs))
    ranked = sorted(votes.items(), key=lambda kv: -kv[1])[:2]
    if not ranked or ranked[0][1] < 2 or (len(ranked) > 1 and ranked[1][1] * 2 > ranked[0][1]):
        return script, None
    return script, ranked[0][0]


@pytest.fixture(scope="module")
def embedder() -> sem.Embedder:
    return sem.builtin_embedder()


def _plain_ids(e: sem.Embedder, text: str) -> list[int]:
    return list(e._tok.encode(text, add_special_tokens=False).ids)


def test_piecewise_tokenization_is_the_tokenizers_on_the_evaluation_prompts(embedder: sem.Embedder) -> None:
    assert embedder._split, "the shipped vocabulary allows splitting (no token has a '▁' after another character)"
    for text in _PAIRS:
        assert embedder.token_ids(text) == _plain_ids(embedder, text)
    assert embedder.token_ids("") == []
    assert embedder.token_ids("ends with a space ") == _plain_ids(embedder, "ends with a space ")


@settings(max_examples=400, deadline=None)
@given(_TEXT)
def test_piecewise_tokenization_is_the_tokenizers_on_any_text(embedder: sem.Embedder, text: str) -> None:
    assert embedder.token_ids(text) == _plain_ids(embedder, text)


def test_the_piece_cache_is_bounded(embedder: sem.Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sem, "_PIECE_CACHE_MAX", 50)
    for start in range(0, 200, 20):
        text = " ".join(f"w{i}" for i in range(start, start + 30))
        assert embedder.token_ids(text) == _plain_ids(embedder, text)
        assert len(embedder._pieces) <= 50
    text = " ".join(f"v{i}" for i in range(120))  # more new pieces in one turn than the bound
    assert embedder.token_ids(text) == _plain_ids(embedder, text)
    assert len(embedder._pieces) <= 50
    long = "x" * 500 + " tail"
    assert embedder.token_ids(long) == _plain_ids(embedder, long)
    assert "x" * 500 not in embedder._pieces, "long pieces are not kept"


def test_fast_guards_equal_the_plain_guards_on_the_evaluation_prompts() -> None:
    for text in _PAIRS:
        assert sem.guards(text) == reference_guards(text), text


@settings(max_examples=600, deadline=None)
@given(_TEXT)
def test_fast_guards_equal_the_plain_guards_on_any_text(text: str) -> None:
    assert sem.guards(text) == reference_guards(text)
