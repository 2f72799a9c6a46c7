"""With content off the request log keeps only edgeroute's own error messages, matched by a
list kept by hand: each message a stream's protocol check gives must be on it, or the log
shows "withheld" where edgeroute said what went wrong (a new check's message was missing)."""

from __future__ import annotations

import re
from pathlib import Path

import edgeroute.sse
from edgeroute.requestlog.content import error_text

_RAISED = re.compile(r'raise StreamProtocolError\("([^"]+)"\)')


def test_every_stream_protocol_message_is_kept_with_content_off() -> None:
    messages = _RAISED.findall(Path(edgeroute.sse.__file__).read_text())
    assert len(messages) >= 4
    for message in messages:
        text = f"the upstream {message}"  # as `dispatch.attempt._failure_of` words it
        assert error_text(text, "none") == text, message


def test_an_upstreams_words_are_not() -> None:
    assert "PROMPTSECRET" not in error_text("Bad input: PROMPTSECRET_B was refused", "none")
