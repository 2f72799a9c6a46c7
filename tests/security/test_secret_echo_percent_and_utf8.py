"""A key written percent-encoded as no URL-encoder of the key's own writes it (`sk%2Dlive%2D…`:
an encoder escaping every sign, a client pasting the key from a URL), or a secret with non-ASCII
characters quoted in base64 or hex (a Basic-auth password, UTF-8 as RFC 7617 says), reached the
client: only the forms `quote` writes were known, and only ASCII secrets were looked for encoded.
The end-to-end cases (an upstream echoing them, the openai SDK as client, the JSON log and the
request log) are in `test_secret_echo_encodings.py`; these are the exits' function itself."""

from __future__ import annotations

import base64
import logging
from urllib.parse import quote

import pytest

from edgeroute import redact
from edgeroute.redact import MARKER

SK = "sk-live-9f8e7d6c5b4a39281706"  # a key of a known shape, and known
UTF8 = "pässwört-Zq8vT2mN5pL1"  # a password with non-ASCII letters


@pytest.fixture(autouse=True)
def _known() -> None:
    redact.register(SK)
    redact.register(UTF8)
    redact._KNOWN.settle()


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.mark.parametrize(
    "echoed",
    [
        SK.replace("-", "%2D"),
        SK.replace("-", "%2d"),
        "".join(f"%{b:02X}" for b in SK.encode()),
        SK.replace("-", "%252D"),  # encoded twice
        quote(UTF8, safe="").lower(),
        _b64(UTF8),
        _b64(f"admin:{UTF8}"),  # a Basic pair, the password at one alignment
        _b64(f"ab:{UTF8}"),
        _b64(f"a:{UTF8}").rstrip("="),
        UTF8.encode().hex(),
        UTF8.encode().hex().upper(),
    ],
)
def test_the_key_is_redacted_in_the_clients_error_and_the_log(echoed: str, caplog: pytest.LogCaptureFixture) -> None:
    said = f"Unsupported value in header, got {echoed} (see docs)"
    assert redact.message(said) == f"Unsupported value in header, got {MARKER} (see docs)"
    record = logging.LogRecord("edgeroute.test", logging.WARNING, __file__, 1, "upstream said: %s", (said,), None)
    redact.RedactingFilter().filter(record)
    assert record.getMessage() == f"upstream said: Unsupported value in header, got {MARKER} (see docs)"


def test_percent_escapes_without_a_secret_are_kept_as_written() -> None:
    said = "quota at 50% for https://api.example/v1/a%20b?q=c%2Dd&x=%E2%9C%93 and %zz"
    assert redact.message(said) == said
    url = f"https://api.example/v1/chat?model=x&note={SK.replace('-', '%2D')}&y=%20z"
    assert redact.message(url) == f"https://api.example/v1/chat?model=x&note={MARKER}&y=%20z"


def test_many_percent_encoded_runs_take_one_pass_more_and_only_a_masked_one_is_rewritten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream's 1 MiB error event made of percent-escapes is masked in one pass more, not one
    pass a run (as JSON strings, `test_redaction_of_many_json_strings.py`)."""
    runs = [f"q%3D{i}%2Dx%2F%252Fy" for i in range(20_000)]
    runs[12_345] = f"k%3D{SK.replace('-', '%2D')}"
    said = " ".join(runs)
    passes = 0
    masked = redact._masked

    def counted(s: str) -> str:
        nonlocal passes
        passes += 1
        return masked(s)

    monkeypatch.setattr(redact, "_masked", counted)
    out = redact.text(said)
    assert passes == 2, passes  # the runs decoded (once and twice) together, then the text
    assert out == said.replace(runs[12_345], f"k={MARKER}")  # every other byte as spelled
