"""The process's logging: JSON lines or text, a level, the request id on every line.

The request id lives in a context variable set when a request starts (`bind_request`);
every task and callback spawned from the request inherits it, so each line logged on
its behalf carries it without being passed around. The decision log (`edgeroute.decisions`,
one line per request when `server.decision_log` is on) is a logger like the others;
its line is the request's decision fields (JSON), with the common fields in JSON mode.

Secrets: the redaction filter (`edgeroute.redact`) is installed on the handler, so that a
token pasted into a message never reaches the output.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import sys
from typing import Any, TextIO

import orjson

from edgeroute import redact
from edgeroute.telemetry.settings import LogFormat, LogLevel

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgeroute_request_id", default=None)
_DECISIONS = "edgeroute.decisions"
_MARK = "_edgeroute_handler"  # on the handlers set up here, so that a second set-up replaces them


def bind_request(request_id: str) -> None:
    """Marks the current task (and whatever it spawns) as working for `request_id`."""
    REQUEST_ID.set(request_id)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


def _iso(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def redacted(fields: dict[str, Any]) -> dict[str, Any]:
    """A record's `fields` with credential shapes replaced in their text: the redaction filter
    sees only the message, and a field may be a client's text (the model it asked for)."""
    return {k: redact.text(v) if isinstance(v, str) else v for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, the record's `fields`, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in redacted(fields).items():
                out.setdefault(k, v)
        if record.exc_text:  # already formatted (and redacted) by the redaction filter
            out["exc"] = record.exc_text
        elif record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact.json_printable(orjson.dumps(out, default=str).decode())  # fields may hold client text


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id]: message`; the decision log's lines are JSON, as in JSON
    mode: its time (`ts`) and its fields (the request id among them)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if record.name == _DECISIONS and isinstance(fields, dict):
            line = {"ts": _iso(record.created), **redacted(fields)}
            return redact.json_printable(orjson.dumps(line, default=str).decode())  # a client's model name
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)


def setup(
    fmt: LogFormat = "text", level: LogLevel = "warning", decision_log: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Configures the root logger (once per process; a second call replaces the first's handler)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    redact.install_log_filter(handler)  # no secret in any line, whatever logged it
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The decision log is its own switch: on at INFO whatever the level, off otherwise.
    decisions = logging.getLogger(_DECISIONS)
    decisions.setLevel(logging.INFO if decision_log else logging.CRITICAL + 1)
    return handler
