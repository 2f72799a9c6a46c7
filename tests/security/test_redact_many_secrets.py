"""The known secrets' pattern is a trie of them: with thousands registered (many rotated keys,
a long-lived process) a short message is redacted in microseconds, not a millisecond, and it
replaces exactly what a plain alternation of the values, longest first, replaces."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute.redact import MARKER, _alternatives, _anywhere, _Known

# Values that share prefixes, end inside one another and hold the regex's own characters.
_ALPHABET = "ab-.:/?*+()[]|\\$^ 1"
_values = st.lists(st.text(_ALPHABET, min_size=1, max_size=12), min_size=1, max_size=30, unique=True)


def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-])(?:{pattern})(?![\w-])")


@settings(max_examples=300, deadline=None)
@given(values=_values, text=st.text(_ALPHABET, max_size=80))
def test_the_trie_replaces_what_the_plain_alternation_replaces(values: list[str], text: str) -> None:
    longest_first = sorted(values, key=len, reverse=True)
    plain = _compiled("|".join(map(re.escape, longest_first)))
    trie = _compiled(_alternatives(longest_first))
    for candidate in (text, " ".join(values), text + " " + " ".join(reversed(values)) + text):
        assert trie.sub("[R]", candidate) == plain.sub("[R]", candidate)


def test_a_value_that_extends_another_is_replaced_whole_and_a_partial_one_not() -> None:
    trie = _compiled(_alternatives(["abcdefghij", "abcdefgh"]))
    assert trie.sub("[R]", "x abcdefghij y abcdefgh z abcdefghi") == "x [R] y [R] z abcdefghi"


def test_thousands_of_values_each_found() -> None:
    values = sorted({f"sk-{i:06d}-{i * 7919 % 100003:05d}" for i in range(4096)}, key=len, reverse=True)
    trie = _compiled(_alternatives(values))
    for v in values[::97]:
        assert trie.sub("[R]", f"the key {v} was refused") == "the key [R] was refused"
    assert trie.sub("[R]", "sk-000001-00000 is not one") == "sk-000001-00000 is not one"


_KEYISH = "aB1+/=_-.%"
_keys = st.lists(st.text(_KEYISH, min_size=16, max_size=24), min_size=1, max_size=20, unique=True)


@settings(max_examples=200, deadline=None)
@given(values=_keys, text=st.text(_KEYISH + " :x", max_size=120))
def test_values_that_are_no_words_are_replaced_wherever_they_stand(values: list[str], text: str) -> None:
    """Looked for only inside the runs of key characters that can hold them (not at every
    position), values that are no words are replaced as a plain alternation over the whole text
    replaces them, glued to other characters too; words only as whole tokens."""
    known = _Known(anywhere=True)
    for v in values:
        known.add(v)
    anywhere = sorted((v for v in values if _anywhere(v)), key=len, reverse=True)
    words = sorted((v for v in values if not _anywhere(v)), key=len, reverse=True)
    for candidate in (text, "x".join(values), text + "".join(reversed(values)) + text):
        expected = re.sub("|".join(map(re.escape, anywhere)), MARKER, candidate) if anywhere else candidate
        if words:
            expected = _compiled("|".join(map(re.escape, words))).sub(MARKER, expected)
        assert known.sub(candidate) == expected
