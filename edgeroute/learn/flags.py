"""Argument types of the `router` and figure scripts' flags (comma-separated lists)."""

from __future__ import annotations

import argparse


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"iteration counts must be >= 1: {text!r}")
    return vals


def feature_sets(text: str) -> list[str]:
    from edgeroute.learn.selection import FEATURE_SETS  # numpy: the training extra

    vals = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in vals if v not in FEATURE_SETS]
    if not vals or unknown:
        raise argparse.ArgumentTypeError(
            f"feature sets are a comma-separated list of {', '.join(FEATURE_SETS)}: {text!r}"
        )
    return vals
