"""An ordinary error message (2 KB of words, no secret, no address) is redacted without the
scans that only a secret or an address needs: the internal-address pattern tried at every word
was more than half of a client error's redaction (250 of 410 µs on a loaded 2-core machine; see
the figures in the session's report), the percent-escape step runs only on a text with an escape."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from edgeroute import redact

WORDS = "the upstream rejected the request because the model parameter was invalid for this deployment".split()


class _Spy:
    def __init__(self, pattern: re.Pattern[str], calls: list[str]) -> None:
        self.pattern, self.calls = pattern, calls

    def sub(self, repl: Any, s: str) -> str:
        self.calls.append(s)
        return self.pattern.sub(repl, s)

    def finditer(self, s: str) -> Any:
        self.calls.append(s)
        return self.pattern.finditer(s)


def test_an_ordinary_message_pays_for_no_address_scan_and_no_percent_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned: list[str] = []
    monkeypatch.setattr(redact, "_ADDRESS", _Spy(redact._ADDRESS, scanned))
    monkeypatch.setattr(redact, "_PERCENT_RUN", _Spy(redact._PERCENT_RUN, scanned))
    said = " ".join(random.Random(7).choice(WORDS) for _ in range(400))[:2048] + " (quota at 50%)"
    assert redact.message(said) == said
    assert scanned == []
    for address in ("10.0.0.5:8443", "http://localhost/x", "[fd00::1]:9000", "::1"):
        assert redact.message(f"{said} failed at {address} today") == f"{said} failed at {redact.MARKER} today"
    assert len(scanned) == 4
