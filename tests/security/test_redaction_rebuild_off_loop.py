"""A change to the known secrets (a rotation, a new key) no longer stalls the event loop: the
first redaction after it rebuilt every pattern on the caller's thread, 2 ms with 20 secrets but
about a second at the 4,096 bound, once per change for a process that had rotated thousands of
keys. The patterns are now built in a thread and swapped in; meanwhile the secrets registered
since the last build are looked for as plain strings, so none is ever written in clear."""

from __future__ import annotations

import base64
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeroute import redact
from edgeroute.redact import MARKER
from tests.conftest import eventually
from tests.security.test_redaction_set_keeps_secrets_in_use import known_values_restored  # noqa: F401  (a fixture)

NEW = "Nw7/rotatedKEY+9f3k2LmQ8xZp"  # the key a rotation brings


async def _settled() -> bool:
    return not getattr(redact._KNOWN, "building", False)


@pytest.mark.usefixtures("known_values_restored")
async def test_a_new_secret_is_redacted_at_once_and_the_patterns_are_built_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(4096):  # a process that has rotated thousands of keys
        redact.register(f"Rot8/key{i:06d}+abcdefghijklmn")
    redact.text("warm up")
    await eventually(_settled, "the first build")
    built_on: list[threading.Thread] = []
    real = redact._alternatives

    def spy(values: list[str]) -> str:
        built_on.append(threading.current_thread())
        return real(values)

    monkeypatch.setattr(redact, "_alternatives", spy)
    redact.register(NEW)
    basic = base64.b64encode(f"user:{NEW}".encode()).decode()
    said = f"Incorrect API key provided: {NEW}, {NEW.upper()}, Basic {basic}, token{NEW}was"
    expected = f"Incorrect API key provided: {MARKER}, {MARKER}, Basic {MARKER}, token{MARKER}was"
    assert redact.outbound(said) == expected  # from the first text on
    assert threading.current_thread() not in built_on  # the loop's thread built nothing
    await eventually(lambda: _swapped(built_on), "the patterns built in a thread and swapped in")
    assert redact.outbound(said) == expected
    assert redact.outbound("Rot8/key000042+abcdefghijklmn") == MARKER  # the others too


async def _swapped(built_on: list[threading.Thread]) -> bool:
    return bool(built_on) and await _settled()


_KEYISH = "aB1+/=_-.%"
_values = st.lists(st.text(_KEYISH + "xyz", min_size=8, max_size=24), min_size=1, max_size=12, unique=True)


@settings(max_examples=300, deadline=None)
@given(values=_values, text=st.text(_KEYISH + " :xyzXYZ", max_size=120))
def test_the_gap_replaces_what_the_built_patterns_replace(values: list[str], text: str) -> None:
    """While a build runs, the plain-string search of the new forms replaces what the patterns
    will (no words anywhere in any case, words as whole tokens, leftmost and longest first)."""
    matchers, gap = redact._Matchers(values, True), redact._Gap(values, True)
    for candidate in (text, "x".join(values), text + "".join(reversed(values)).upper() + text):
        assert gap.sub(candidate) == matchers.sub(candidate)
        assert gap.found_in(candidate) == matchers.found_in(candidate)
