"""Provider credentials by reference: ``env:NAME``, ``file:PATH`` or a literal.

References are resolved when the config loads (so a missing secret is a load error,
not a 500 on the first request) and again on reload, which is how a rotated secret
is picked up. A :class:`Secret` never prints its value.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeroute import redact


class SecretError(ValueError):
    """A secret reference could not be resolved."""


class Secret:
    """A resolved credential whose repr and str hide the value."""

    __slots__ = ("_value", "reference")

    def __init__(self, value: str, reference: str) -> None:
        self._value = value
        self.reference = reference
        redact.register(value)  # whatever edgeroute resolves as a secret is redacted from every exit

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.reference!r})"

    __str__ = __repr__


def resolve(reference: str, *, base_dir: Path | None = None) -> Secret:
    """Resolves ``env:NAME`` / ``file:PATH`` (relative to `base_dir`) / a literal value.

    A value with a line break or another control character is refused (without showing it):
    secrets become header values and URLs, where a line break would inject headers, and a
    multi-line "key" means the reference points at the wrong file (say /etc/shadow)."""
    if reference.startswith("env:"):
        name = reference[4:]
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"environment variable {name} is not set")
        return _checked(value, reference)
    if reference.startswith("file:"):
        path = Path(reference[5:]).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            return _checked(path.read_text().strip(), reference)
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise SecretError(f"cannot read secret file {path}: {why}") from None
    return _checked(reference, "<literal>")


def _checked(value: str, reference: str) -> Secret:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        where = reference if reference != "<literal>" else "the literal secret"
        raise SecretError(f"{where} holds a line break or control character (not shown); is it the right file?")
    return Secret(value, reference)
