"""Price resolution: a deployment's `price` given as a reference to the bundled catalogue.

``price: catalogue`` looks up the deployment's own model; ``price: {catalogue: "gpt-4o", ...}``
names an entry and may override any field. References are resolved while the config
validates, so the rest of the proxy only ever sees concrete prices. The catalogue is the
bundled `cost/catalogue.json` unless `edgeroute prices update` wrote a newer one (see
`prices_path`). What prices cost at a given time (windows, ceilings) is `edgeroute.cost.prices`'s.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from edgeroute.config import price_catalogue

# The catalogue is cost control's data; the config only reads it.
CATALOGUE_PATH = Path(__file__).parent.parent / "cost" / "catalogue.json"
ENV_PRICES = "EDGEROUTE_PRICES"

_loaded: dict[tuple[str, int, int], dict[str, Any]] = {}


def prices_path() -> Path:
    """Where `edgeroute prices update` writes a catalogue and the proxy looks for one first:
    `$EDGEROUTE_PRICES`, else `$XDG_DATA_HOME/edgeroute/prices.json` (~/.local/share/...)."""
    if env := os.environ.get(ENV_PRICES):
        return Path(env)
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edgeroute" / "prices.json"


def catalogue_file() -> Path:
    """The catalogue in force: an updated one where `prices_path()` points, else the bundled one."""
    path = prices_path()
    return path if path.is_file() else CATALOGUE_PATH


def read_catalogue(path: Path) -> dict[str, Any]:
    """The checked catalogue at `path` (a `CatalogueError` naming each bad entry)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise price_catalogue.CatalogueError(str(path), [f"cannot be read as JSON: {e}"]) from None
    return price_catalogue.check(data, str(path))


def catalogue() -> dict[str, Any]:
    """The catalogue in force, read again when its file changed (so a reload after
    `prices update` prices by the new one)."""
    path = catalogue_file()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if (data := _loaded.get(key)) is None:
        data = read_catalogue(path)
        _loaded.clear()
        _loaded[key] = data
    return data


def resolve_name(name: str, cat: dict[str, Any] | None = None) -> str | None:
    """The key for `name` (an alias, or `provider/model`) in `cat` (default: the catalogue in force), or None."""
    cat = catalogue() if cat is None else cat
    models: dict[str, Any] = cat["models"]
    aliases: dict[str, str] = cat.get("aliases", {})
    key = aliases.get(name, name)
    if key not in models and "/" in key:
        tail = key.split("/", 1)[1]
        key = aliases.get(tail, tail)
    return key if key in models else None


def unknown_model(name: str) -> ValueError:
    cat = catalogue()
    close = difflib.get_close_matches(name, list(cat["models"]) + list(cat.get("aliases", {})), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ValueError(f"model {name!r} is not in the price catalogue ({catalogue_file()}){hint}")


def catalogue_entry(name: str) -> dict[str, Any]:
    """The config fields of catalogue entry `name` (aliases and a `provider/` prefix allowed)."""
    key = resolve_name(name)
    if key is None:
        raise unknown_model(name)
    e = catalogue()["models"][key]
    out: dict[str, Any] = {"input_per_mtok": e["input"], "output_per_mtok": e["output"]}
    if "cached_input" in e:
        out["cached_input_per_mtok"] = e["cached_input"]
    if "cache_write" in e:
        out["cache_write_per_mtok"] = e["cache_write"]
    for kind in ("audio_input", "audio_output"):
        if kind in e:
            out[f"{kind}_per_mtok"] = e[kind]
    if "per_request" in e:
        out["per_request"] = e["per_request"]
    if "tool_calls" in e:
        out["tool_calls"] = dict(e["tool_calls"])
    out["source"] = f"catalogue:{key}@{e['as_of']}"
    return out


def catalogue_name(raw: Any, model: str) -> str | None:
    """The catalogue entry a deployment's raw `price` refers to, or None when it gives prices itself."""
    if raw == "catalogue":
        return model
    if isinstance(raw, dict) and "catalogue" in raw:
        ref = raw["catalogue"]
        return model if ref is True or ref == "self" else ref if isinstance(ref, str) else None
    return None


def resolve_price_input(raw: Any, model: str) -> Any:
    """Turns a catalogue reference in a deployment's raw `price` into explicit fields."""
    if raw == "catalogue":
        return catalogue_entry(model)
    if isinstance(raw, dict) and "catalogue" in raw:
        name = catalogue_name(raw, model)
        if name is None:
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
