"""Redacting raw JSON with many escaped strings: one masking pass for all of them.

An upstream's error event (held whole up to 1 MiB) made of 150,000 short escaped strings was
masked one string at a time, each a full pass of every pattern: 4 s of the event loop. The
decoded strings are now masked together, and only those a mask changed are written again.
"""

from __future__ import annotations

import json

import orjson
import pytest

from edgeroute import redact

KEY = "sk-live-9f8e7d6c5b4a39281706"


@pytest.fixture(autouse=True)
def _known() -> None:
    redact.register(KEY)
    redact._KNOWN.settle()


def test_many_escaped_strings_take_one_pass_and_only_a_masked_one_is_rewritten(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    items = ["a\nb" for _ in range(20_000)]
    items[12_345] = f"key:\n{KEY}"  # glued to the escape's letter as written
    items[17] = "nul\x00 and \ud800 stay as spelled"
    raw = json.dumps({"error": {"items": items}})  # (`\\ud800` escaped: not UTF-8)
    passes = 0
    credentials = redact._credentials

    def counted(s: str) -> str:
        nonlocal passes
        passes += 1
        return credentials(s)

    monkeypatch.setattr(redact, "_credentials", counted)
    out = redact.text(raw)
    assert passes <= 3, passes  # the decoded strings together, then the text as written
    assert KEY not in out and "sk-live" not in out
    # That string is written again, masked; every other byte is as the upstream spelled it.
    assert out == raw.replace(json.dumps(items[12_345]), json.dumps(f"key:\n{redact.MARKER}"))


def test_a_string_holding_the_joint_is_still_masked_alone() -> None:
    # A NUL between newlines is the joint the strings are masked together with.
    raw = orjson.dumps(["x\n\x00\ny", f"\n{KEY}", "\n\x00\n"]).decode()
    out = redact.text(raw)
    assert KEY not in out
    assert orjson.loads(out)[0] == "x\n\x00\ny" and orjson.loads(out)[2] == "\n\x00\n"


@pytest.mark.parametrize(
    "raw",
    [
        '"C:\\\\Users\\\\nsk-live-9f8e7d6c5b4a39281706"',  # escaped backslashes, then the key
        '"bad \\q escape" then "\\u0073k-live-9f8e7d6c5b4a39281706"',
        '"cut in an escape: \\nsk-live-9f8e7d6c5b4a39281706\\u00',
    ],
)
def test_strings_beside_odd_escapes_are_masked(raw: str) -> None:
    assert "9f8e7d6c5b4a39281706" not in redact.text(raw)
