"""Small helpers for the text people read: counts with their nouns."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 rule`, `2 rules`, `0 rules`: a count with its noun (`plural` when it is not noun + s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"
