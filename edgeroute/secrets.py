"""Provider credentials by reference: ``env:NAME``, ``file:PATH``, ``exec:COMMAND`` or a literal.

References are resolved when the config loads (so a missing secret is a load error,
not a 500 on the first request) and again on reload. ``file:`` and ``exec:`` secrets
stay live after that: :func:`refresh` (run by the server every second or so) re-reads a
file when its size or modification time changes (how Kubernetes and Docker rotate
mounted secrets) and re-runs a command once its refresh interval has passed (sops, the
1Password, Vault or cloud CLIs). Adapters read the value on every request, so a new
value applies without a restart. A failed refresh keeps the last good value, logs an
error naming the reference (never the value nor the command's output) and counts in
:data:`STATUS`, which `/metrics` exports for alerting.

A :class:`Secret` never prints its value.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shlex
import subprocess
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgeroute import redact

log = logging.getLogger("edgeroute.secrets")

REFERENCE_PREFIXES = ("env:", "file:", "exec:")
EXEC_TIMEOUT_S = 10.0
# The refresh interval of `exec:` secrets (the config's `governance.secrets_refresh` sets it).
_refresh_s = 30.0


class SecretError(ValueError):
    """A secret reference could not be resolved."""


class Secret:
    """A resolved credential whose repr and str hide the value."""

    __slots__ = ("__weakref__", "_value", "reference", "version")

    def __init__(self, value: str, reference: str) -> None:
        self._value = value
        self.reference = reference
        self.version = 0  # moves when a refresh changes the value (for headers built ahead)
        redact.register(value)  # whatever edgeroute resolves as a secret is redacted from every exit
        _in_use.add(self)

    def reveal(self) -> str:
        return self._value

    def _replace(self, value: str) -> None:
        if value != self._value:
            redact.register(value)
            old, self._value = self._value, value
            self.version += 1
            for forget in _on_replaced:
                forget(old)

    def __repr__(self) -> str:
        return f"Secret({self.reference!r})"

    __str__ = __repr__


@dataclass(slots=True)
class _Live:
    """A `file:` or `exec:` secret kept current."""

    secret: Secret
    path: Path | None = None
    command: str | None = None
    stamp: tuple[int, int] | None = None  # the file's (mtime_ns, size) when last read
    seen: tuple[int, int] | None = None  # a changed file's stamp at the refresh before: read once it holds
    next_at: float = 0.0  # exec: when to run it again
    failing: bool = False


@dataclass(slots=True)
class Status:
    """What alerting needs: failed refreshes so far, and which references fail now."""

    refresh_failures_total: int = 0
    refreshes_total: int = 0
    failing: set[str] = field(default_factory=set)


STATUS = Status()
_live: dict[str, _Live] = {}
# Every secret something still holds (a config's keys, a provider's adapter): re-registered at each
# refresh pass, so that the redaction set's bound drops superseded values, never one in use.
_in_use: weakref.WeakSet[Secret] = weakref.WeakSet()
# How often: a refresh adds at most one value per `exec:` secret a second, and the bound is 4,096.
KEEP_KNOWN_S = 10.0
_keep_at = 0.0
# Called with a secret's old value once a refresh replaces it, from the refresh's thread: what
# holds copies of it (the upstream request heads built with it) drops them.
_on_replaced: list[Callable[[str], None]] = []


def on_replaced(forget: Callable[[str], None]) -> None:
    """Calls `forget` with a secret's old value whenever a refresh replaces it."""
    if forget not in _on_replaced:
        _on_replaced.append(forget)


_offline: contextvars.ContextVar[bool] = contextvars.ContextVar("offline", default=False)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Within it, references are checked for their form only: no command runs, no file or
    environment variable is read, nothing is registered for redaction. A config sent over the
    API is checked this way, so the check neither executes what it is sent nor tells its
    sender which files and variables the host has (nor lets it blank words out of every log)."""
    token = _offline.set(True)
    try:
        yield
    finally:
        _offline.reset(token)


def is_offline() -> bool:
    """Whether checks must leave the host alone (see `offline`)."""
    return _offline.get()


def _unresolved(reference: str) -> Secret:
    """A stand-in for a reference not resolved (offline): its own text, so two references are
    told apart (two keys naming one variable still collide), registered nowhere."""
    for prefix in REFERENCE_PREFIXES:
        if reference.startswith(prefix) and not reference[len(prefix) :].strip():
            raise SecretError(f"{prefix} names nothing")
    stand_in = Secret.__new__(Secret)
    stand_in._value, stand_in.reference, stand_in.version = reference, "<unresolved>", 0
    return stand_in


def set_refresh_interval(seconds: float) -> None:
    global _refresh_s
    _refresh_s = seconds


def _checked(value: str, reference: str) -> str:
    """A value with a line break or another control character is refused (without showing it):
    secrets become header values and URLs, where a line break would inject headers, and a
    multi-line "key" means the reference points at the wrong file (say /etc/shadow)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        where = reference if reference != "<literal>" else "the literal secret"
        raise SecretError(f"{where} holds a line break or control character (not shown); is it the right file?")
    return value


def _read_file(path: Path, reference: str) -> tuple[str, tuple[int, int]]:
    """The file's value and stamp. An empty file is refused: no credential is empty, and a file
    being rewritten in place (truncated, then written) is empty for a moment."""
    try:
        st = path.stat()
        value = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise SecretError(f"cannot read secret file {path}: {why}") from None
    if not value:
        raise SecretError(f"secret file {path} is empty")
    return _checked(value, reference), (st.st_mtime_ns, st.st_size)


def _run(command: str) -> str:
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise SecretError(f"cannot parse the secret command: {e}") from None
    if not argv:
        raise SecretError("the secret command is empty")
    try:
        out = subprocess.run(argv, capture_output=True, timeout=EXEC_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SecretError(f"secret command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise SecretError(f"secret command timed out after {EXEC_TIMEOUT_S:g} s") from None
    except OSError as e:
        raise SecretError(f"cannot run the secret command: {e.strerror}") from None
    if out.returncode != 0:
        # Neither stdout nor stderr: either may carry the secret or parts of it.
        raise SecretError(f"secret command exited with status {out.returncode}")
    try:  # bytes that are not text are not a credential: a broken CLI's garbage, kept out
        value = out.stdout.decode().strip()
    except UnicodeDecodeError:
        raise SecretError("secret command printed bytes that are not UTF-8 text (not shown)") from None
    if not value:
        raise SecretError("secret command printed nothing")
    return _checked(value, "exec:")


def url_problem(reference: str) -> str | None:
    """Why `reference` (a webhook's URL, or a reference to one) cannot be used, or None.
    Offline, a reference's URL is not read, so only its form is checked: its own text is no
    URL, and the API's check refused every webhook given as the README advises."""
    try:
        url = resolve(reference).reveal()
    except SecretError as e:
        return str(e)
    if _offline.get() and reference.startswith(REFERENCE_PREFIXES):
        return None
    return None if url.startswith(("http://", "https://")) else "a webhook URL starts with http:// or https://"


def resolve(reference: str, *, base_dir: Path | None = None) -> Secret:
    """Resolves ``env:NAME`` / ``file:PATH`` (relative to `base_dir`) / ``exec:COMMAND`` / a literal."""
    if _offline.get():
        return _unresolved(reference)
    if reference.startswith("env:"):
        name = reference[4:]
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"environment variable {name} is not set")
        return Secret(_checked(value, reference), reference)
    if reference.startswith("file:"):
        path = Path(reference[5:]).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        value, stamp = _read_file(path, reference)  # a load or reload reads it again, as before
        key = f"file:{path.absolute()}"
        live = _live.get(key)
        if live is None:
            live = _live[key] = _Live(Secret(value, reference), path=path)
        live.secret._replace(value)
        live.stamp, live.failing = stamp, False
        STATUS.failing.discard(key)
        return live.secret
    if reference.startswith("exec:"):
        command = reference[5:].strip()
        live = _live.get(reference)
        if live is None or live.failing:
            value = _run(command)
            if live is None:
                live = _live[reference] = _Live(Secret(value, reference), command=command)
            live.secret._replace(value)
            live.failing = False
            live.next_at = time.monotonic() + _refresh_s
            STATUS.failing.discard(reference)
        return live.secret
    return Secret(_checked(reference, "<literal>"), "<literal>")


def refresh(now: float | None = None) -> int:
    """Re-reads changed files and due commands (blocking: run it off the event loop).
    Returns how many secrets changed value."""
    now = time.monotonic() if now is None else now
    changed = 0
    for key, live in list(_live.items()):
        try:
            if live.path is not None:
                st = live.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp == live.stamp and not live.failing:
                    continue
                if stamp != live.seen:
                    # Changed since the last look: read it once it has stayed so for a refresh. A
                    # file rewritten in place (not moved over) was read half-written and sent.
                    live.seen = stamp
                    continue
                value, live.stamp = _read_file(live.path, key)
            elif live.command is not None:
                # Due by the interval in force (the first one was set before the config's).
                live.next_at = min(live.next_at, now + _refresh_s)
                if now < live.next_at:
                    continue
                live.next_at = now + _refresh_s
                value = _run(live.command)
            else:
                continue
        except (OSError, SecretError) as e:
            msg = e.strerror if isinstance(e, OSError) and not isinstance(e, SecretError) else str(e)
            STATUS.refresh_failures_total += 1
            STATUS.failing.add(key)
            if not live.failing:
                log.error("secret %s could not be refreshed (%s); keeping the last good value", key, msg)
            live.failing = True
            continue
        STATUS.refreshes_total += 1
        if live.failing:
            log.warning("secret %s refreshed again", key)
        live.failing = False
        STATUS.failing.discard(key)
        if value != live.secret.reveal():
            live.secret._replace(value)
            changed += 1
            log.info("secret %s changed; applied", key)
    global _keep_at
    if now >= _keep_at:
        _keep_at = now + KEEP_KNOWN_S
        _keep_known()
    return changed


def _keep_known() -> None:
    """Marks every secret in use as current for redaction (see `redact.keep_current`): an `exec:`
    command minting a new token at each run adds a value every refresh, and after 4,096 of them
    the bound dropped the oldest, the config's own provider keys and tokens, still in use."""
    try:
        values = [s.reveal() for s in list(_in_use)]
    except RuntimeError:  # a config loading in another thread changed the set: the next pass
        return
    redact.keep_current(values)
