"""The shadow log: each mirrored pair (the client's answer and the shadow's, their costs and
latencies) as one JSON line, ready for offline comparison. Its answers follow the request
log's content policy (`request_log.log_content`, `content_models`, `content_keys`; the more
private of the primary's and the mirror's): `none` (the default) keeps no text, only what a
comparison needs (each answer's length, whether the two are the same, how many of their words
they share); `redacted` keeps them with PII and credentials replaced; `full` with credentials
replaced. Past `learning.shadow_log_max_bytes` the file is rotated (`<file>.1`, `.2`, ...;
`shadow_log_keep` of them kept): request volume alone must not fill the disk. The workers of
one `serve --workers N` write the same file, so a rotation is taken under a lock on
`<file>.lock` (`flock`), and only when the file is still the one that grew past the bound:
two workers past it together rotate it once."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from edgeroute import _core, redact
from edgeroute.accounting import RequestRecord
from edgeroute.requestlog.settings import LogContent, RequestLog, more_private


class ShadowLog:
    """Appends JSON lines to a file from a thread (or keeps the last pairs in memory)."""

    def __init__(self, path: Path | None, keep: int = 1000, max_bytes: int = 100 * 2**20, files: int = 5) -> None:
        self.path = path
        self.keep = keep
        self.max_bytes = max_bytes
        self.files = files  # rotated files kept beside the live one
        self.pairs: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, pair: dict[str, Any]) -> None:
        with self._lock:
            self.pairs.append(pair)
            del self.pairs[: -self.keep]
            if self.path is not None:
                # Readable by its owner alone when it creates it (it may hold answers).
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "ab") as f:
                    f.write(orjson.dumps(pair) + b"\n")
                    size, written = f.tell(), os.fstat(fd).st_ino
                if size >= self.max_bytes:  # once written out: the size re-checked is the file's
                    self._rotate(self.path, written)

    def _rotate(self, path: Path, written: int) -> None:
        """`<file>` becomes `<file>.1`, `.1` becomes `.2`, ...; the oldest past `files` is removed.
        Under the lock file, and only if `path` is still the file written (inode `written`) and
        still past the bound: another process may have rotated it since this one wrote."""
        fd = os.open(path.with_name(f"{path.name}.lock"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return  # rotated by another process, nothing written since
            if now.st_ino != written or now.st_size < self.max_bytes:
                return  # rotated by another process (this write went with it)
            path.with_name(f"{path.name}.{self.files}").unlink(missing_ok=True)
            for n in range(self.files - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    path.with_name(f"{path.name}.{n}").replace(path.with_name(f"{path.name}.{n + 1}"))
            path.replace(path.with_name(f"{path.name}.1"))
        finally:
            os.close(fd)  # and with it the lock


SHADOW_LOG = web.AppKey("shadow_log", ShadowLog)


def pair_record(
    primary: RequestRecord, primary_answer: str | None, shadow: RequestRecord, shadow_answer: str | None
) -> dict[str, Any]:
    def side(rec: RequestRecord, answer: str | None) -> dict[str, Any]:
        return {
            "route": rec.route,
            "deployment": rec.deployment,
            "status": rec.status,
            "cost_usd": rec.cost_usd,
            "latency_ms": round(rec.latency_ms, 3),
            "completion_tokens": rec.usage.completion_tokens if rec.usage else None,
            "answer": answer,
        }

    return {
        "ts": time.time(),
        "request_id": primary.request_id,
        "primary": side(primary, primary_answer),
        "shadow": side(shadow, shadow_answer),
    }


def content_mode(settings: RequestLog, primary: RequestRecord, shadow: RequestRecord) -> LogContent:
    """What the pair keeps of its answers: the more private of what the request log keeps of the
    primary (the model asked for, the route that served it) and of the mirror (the candidate and
    its route), for the client's key."""
    return more_private(
        settings.content_for(primary.model, primary.route, primary.key),
        settings.content_for(shadow.model, shadow.route, shadow.key),
    )


_WORD = re.compile(r"\w+")


def _overlap(a: str, b: str) -> float:
    """The share of the two answers' distinct words they have in common (Jaccard, 0 to 1)."""
    x, y = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
    return round(len(x & y) / len(x | y), 3) if x or y else 1.0


def governed(pair: dict[str, Any], mode: LogContent) -> dict[str, Any]:
    """The pair as `mode` lets it be stored: `none` replaces each answer with its length and adds
    `same_answer` and `word_overlap` (when both sides answered); `redacted` replaces PII and
    credentials; `full` credentials (a model repeats what it was sent: a key pasted into a
    prompt, say)."""
    sides = (pair["primary"], pair["shadow"])
    answers = [side["answer"] for side in sides]
    pair["content"] = mode
    for side, answer in zip(sides, answers, strict=True):
        side["answer_chars"] = len(answer) if answer is not None else None
        if answer is None:
            continue
        if mode == "none":
            side["answer"] = None
        else:
            side["answer"] = redact.text(answer)
            if mode == "redacted":
                side["answer"] = _core.redact_pii(side["answer"])
    a, b = answers
    if a is not None and b is not None:
        pair["same_answer"] = a == b
        pair["word_overlap"] = _overlap(a, b)
    return pair
