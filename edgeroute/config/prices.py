"""Price resolution: a deployment's `price` given as a reference to the bundled catalogue.

``price: catalogue`` looks up the deployment's own model; ``price: {catalogue: "gpt-4o", ...}``
names an entry and may override any field. References are resolved while the config
validates, so the rest of the proxy only ever sees concrete prices. What prices cost at a
given time (windows, ceilings) is `edgeroute.cost.prices`'s.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any

# The catalogue is cost control's data; the config only reads it.
CATALOGUE_PATH = Path(__file__).parent.parent / "cost" / "catalogue.json"


@functools.cache
def catalogue() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(CATALOGUE_PATH.read_text())
    return data


def catalogue_entry(name: str) -> dict[str, Any]:
    """The config fields of catalogue entry `name` (aliases and a `provider/` prefix allowed)."""
    cat = catalogue()
    models: dict[str, dict[str, Any]] = cat["models"]
    key = cat["aliases"].get(name, name)
    if key not in models and "/" in key:
        tail = key.split("/", 1)[1]
        key = cat["aliases"].get(tail, tail) if tail in models or tail in cat["aliases"] else key
    if key not in models:
        close = difflib.get_close_matches(name, list(models) + list(cat["aliases"]), n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"model {name!r} is not in the price catalogue of {cat['as_of']}{hint}")
    e = models[key]
    out: dict[str, Any] = {"input_per_mtok": e["input"], "output_per_mtok": e["output"]}
    if "cached_input" in e:
        out["cached_input_per_mtok"] = e["cached_input"]
    if "cache_write" in e:
        out["cache_write_per_mtok"] = e["cache_write"]
    if "per_request" in e:
        out["per_request"] = e["per_request"]
    out["source"] = f"catalogue:{key}@{cat['as_of']}"
    return out


def resolve_price_input(raw: Any, model: str) -> Any:
    """Turns a catalogue reference in a deployment's raw `price` into explicit fields."""
    if raw == "catalogue":
        return catalogue_entry(model)
    if isinstance(raw, dict) and "catalogue" in raw:
        ref = raw["catalogue"]
        name = model if ref is True or ref == "self" else ref
        if not isinstance(name, str):
            raise ValueError("price.catalogue must be a model name, or true for the deployment's model")
        merged = catalogue_entry(name)
        merged.update({k: v for k, v in raw.items() if k != "catalogue"})
        return merged
    return raw


def parse_hhmm(s: str) -> int:
    """Minutes after midnight for "HH:MM" (24:00 allowed as the end of a day)."""
    h, sep, m = s.partition(":")
    if not sep or not h.isdigit() or not m.isdigit() or len(m) != 2:
        raise ValueError(f"{s!r} is not HH:MM")
    minutes = int(h) * 60 + int(m)
    if int(m) >= 60 or minutes > 24 * 60:
        raise ValueError(f"{s!r} is not a time of day")
    return minutes
