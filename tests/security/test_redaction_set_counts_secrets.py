"""The redaction set's bound (4,096) counts secrets, not their forms. Each secret was registered
as up to four values (as written, and URL-encoded three ways), each counted: a key with `+` or
`/` in it took four places, so the set remembered about 1,000 rotated keys, not 4,096, and a
key rotated out 1,024 secrets ago reached the tenant whole when its upstream quoted it. A
secret and its forms are now one entry, kept and dropped together.

Matching in any case must not blank ordinary words: a short secret that is a word (a test
database's password) is replaced in its own case only, as a whole token."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest

from edgeroute import redact
from tests.security.test_redaction_set_keeps_secrets_in_use import known_values_restored  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("known_values_restored")

OLD = "Rot8/oldKEY+0123456789abcdef"  # rotated out long ago, still a secret


def _forms(secret: str) -> list[str]:
    return [secret, quote(secret, safe=""), secret.upper(), base64.b64encode(f"user:{secret}".encode()).decode()]


def test_a_secret_with_many_forms_takes_one_place_in_the_bound() -> None:
    redact.register(OLD)
    for i in range(4000):  # rotated keys after it, each with `+` and `/` (four forms)
        redact.register(f"Rot8/key{i:06d}+abcdefghijklmn")
    for form in _forms(OLD):
        assert redact.outbound(f"Incorrect API key provided: {form}") == f"Incorrect API key provided: {redact.MARKER}"


def test_a_secret_and_its_forms_are_dropped_together() -> None:
    redact.register(OLD)
    for i in range(4096):
        redact.register(f"Rot8/key{i:06d}+abcdefghijklmn")
    assert len(redact._KNOWN._values) == 4096
    assert OLD not in redact._KNOWN._values
    left = {f for forms in redact._KNOWN._values.values() for f in forms}
    assert not [f for f in (OLD, quote(OLD, safe=""), quote(OLD)) if f in left]


@pytest.mark.parametrize(
    ("secret", "said", "kept"),
    [
        ("edgeroute", "Edgeroute failed: EDGEROUTE x-edgeroute-tags", True),  # a word: its own case only
        ("hunter22", "password HUNTER22 refused", False),  # not a word: any case
        ("correcthorsebatterystaple", "got CORRECTHORSEBATTERYSTAPLE", False),  # long: any case
    ],
)
def test_case_is_ignored_for_no_short_word(secret: str, said: str, kept: bool) -> None:
    redact.register(secret)
    assert (redact.text(said) == said) is kept, redact.text(said)
