"""The price catalogue's file format: read, checked, imported, compared and written.

A catalogue is JSON::

    {"format": 2, "currency": "USD",
     "models": {"gpt-4o": {"provider": "openai", "input": 2.5, "output": 10.0,
                           "cached_input": 1.25, "batch_input": 1.25, "batch_output": 5.0,
                           "as_of": "2026-12-03", "source": "https://openai.com/api/pricing/"}},
     "aliases": {"gpt-4o-2024-08-06": "gpt-4o"}}

Prices are USD per million tokens (`per_request`: USD per request; `tool_calls`: USD a call
of each built-in tool, e.g. `{"web_search": 0.01}`, the config's `price.tool_calls`). `input`, `output`,
`as_of` and `source` are required in every entry: a price is a fact, so each says where and
when it was read. LiteLLM's public `model_prices_and_context_window.json` (USD per token)
is imported by `from_litellm`. Where the proxy reads the catalogue is `edgeroute.config.prices`'s.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeroute.atomic_file import replace_file

FORMAT = 2
REQUIRED = ("input", "output")
OPTIONAL = ("cached_input", "cache_write", "audio_input", "audio_output", "batch_input", "batch_output", "per_request")
PRICE_FIELDS = REQUIRED + OPTIONAL
TOOL_CALLS = "tool_calls"  # an object: built-in tool → USD a call (the config schema's `ToolKind`s)
TOOL_KINDS = ("web_search", "web_fetch", "file_search", "code_interpreter", "image_generation")
_TEXT = ("provider", "mode", "as_of", "source", "note")
_MODES = ("chat", "embedding", "completion", "responses")
# LiteLLM's per-token fields → ours (per million tokens).
_LITELLM = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "input_cost_per_audio_token": "audio_input",
    "output_cost_per_audio_token": "audio_output",
    "input_cost_per_token_batches": "batch_input",
    "output_cost_per_token_batches": "batch_output",
}


class CatalogueError(ValueError):
    """Every problem found in a catalogue, each naming the entry and field."""

    def __init__(self, where: str, errors: list[str]) -> None:
        self.errors = [f"{where}: {e}" for e in errors]
        super().__init__("\n".join(self.errors))


def is_date(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return len(value) == 10


def _price_error(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, not {type(value).__name__}"
    if not math.isfinite(value) or value < 0:
        return f"must be a finite number >= 0 (got {value})"
    return None


def check(data: Any, where: str) -> dict[str, Any]:
    """`data` as a catalogue, or a `CatalogueError` listing every bad entry and field."""
    if not isinstance(data, dict):
        raise CatalogueError(where, ["a catalogue is a JSON object with 'models'"])
    errors: list[str] = []
    if data.get("format", FORMAT) != FORMAT:
        errors.append(f"format {data.get('format')!r} is not supported (this version reads {FORMAT})")
    if data.get("currency", "USD") != "USD":
        errors.append(f"currency {data.get('currency')!r}: only USD prices are supported")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise CatalogueError(where, [*errors, "'models' must be a non-empty object of model → prices"])
    for name, e in models.items():
        at = f"models.{name!r}"
        if not isinstance(e, dict):
            errors.append(f"{at}: must be an object")
            continue
        for f in REQUIRED:
            if f not in e:
                errors.append(f"{at}: missing required price {f!r}")
        for f in PRICE_FIELDS:
            if f in e and (problem := _price_error(e[f])) is not None:
                errors.append(f"{at}.{f}: {problem}")
        errors += _tool_call_errors(e.get(TOOL_CALLS, {}), at)
        for f in _TEXT:
            if f in e and not isinstance(e[f], str):
                errors.append(f"{at}.{f}: must be a string")
        if not isinstance(e.get("provider"), str) or not e["provider"]:
            errors.append(f"{at}: missing 'provider'")
        if not isinstance(e.get("source"), str) or not e["source"].strip():
            errors.append(f"{at}: missing 'source' (the URL or named price list the prices were read from)")
        if not is_date(e.get("as_of")):
            errors.append(f"{at}.as_of: must be the date the prices were read, YYYY-MM-DD")
        if e.get("mode", "chat") not in _MODES:
            errors.append(f"{at}.mode: must be one of {', '.join(_MODES)}")
        for f in sorted(set(e) - set(PRICE_FIELDS) - set(_TEXT) - {TOOL_CALLS}):
            errors.append(f"{at}.{f}: unknown field (known: {', '.join((*PRICE_FIELDS, TOOL_CALLS, *_TEXT))})")
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict):
        errors.append("'aliases' must be an object of alias → model")
    else:
        for alias, target in aliases.items():
            if target not in models:
                errors.append(f"aliases.{alias!r}: names {target!r}, which is not in 'models'")
    if errors:
        raise CatalogueError(where, errors)
    return data


def _tool_call_errors(tools: Any, at: str) -> list[str]:
    if not isinstance(tools, dict):
        return [f"{at}.{TOOL_CALLS}: must be an object of tool → USD a call"]
    errors = []
    for kind, price in tools.items():
        if kind not in TOOL_KINDS:
            errors.append(f"{at}.{TOOL_CALLS}.{kind}: unknown tool (known: {', '.join(TOOL_KINDS)})")
        elif (problem := _price_error(price)) is not None:
            errors.append(f"{at}.{TOOL_CALLS}.{kind}: {problem}")
    return errors


def newest(models: dict[str, Any]) -> str:
    return max((str(e["as_of"]) for e in models.values()), default="")


def _per_mtok(per_token: float) -> float:
    return round(per_token * 1e6, 6)  # per-token floats carry noise (2.5e-06 * 1e6 = 2.4999999999999996)


def from_litellm(data: dict[str, Any], source: str, as_of: str) -> tuple[dict[str, Any], int]:
    """LiteLLM's price list as a catalogue (text models with a token price; their own
    `source` URL kept beside `source`), and how many entries were skipped (images, audio,
    rerank, entries without a token price). Bad prices are left for `check` to name."""
    models: dict[str, Any] = {}
    skipped = 0
    for name, e in data.items():
        if name == "sample_spec" or not isinstance(e, dict):
            continue
        mode = e.get("mode", "chat")
        if mode not in _MODES or "input_cost_per_token" not in e:
            skipped += 1
            continue
        out: dict[str, Any] = {"provider": str(e.get("litellm_provider") or "unknown")}
        if mode != "chat":
            out["mode"] = mode
        for theirs, ours in _LITELLM.items():
            value = e.get(theirs)
            if value is None:
                continue
            out[ours] = _per_mtok(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        out.setdefault("output", 0.0)  # embeddings: no output tokens
        origin = e.get("source")
        out["source"] = f"{source} (which cites {origin})" if isinstance(origin, str) and origin else source
        out["as_of"] = as_of
        models[name] = out
    return {"format": FORMAT, "currency": "USD", "models": models, "aliases": {}}, skipped


def is_litellm(data: Any) -> bool:
    """LiteLLM's list is one flat object of model → fields with `litellm_provider`."""
    return (
        isinstance(data, dict)
        and "models" not in data
        and any(isinstance(e, dict) and "litellm_provider" in e for e in data.values())
    )


@dataclass(slots=True)
class Diff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[str, list[str]]] = field(default_factory=list)  # model, ["input 2.5 → 2.0", ...]

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed"]
        for label, names in (("added", self.added), ("removed", self.removed)):
            if names:
                shown = ", ".join(names[:limit]) + (f", … {len(names) - limit} more" if len(names) > limit else "")
                out.append(f"  {label}: {shown}")
        for name, what in self.changed[:limit]:
            out.append(f"  changed {name}: {'; '.join(what)}")
        if len(self.changed) > limit:
            out.append(f"  … {len(self.changed) - limit} more changed")
        return out


def diff(old: dict[str, Any], new: dict[str, Any]) -> Diff:
    """What an update changes: models added, removed, and prices changed (field by field)."""
    a, b = old["models"], new["models"]
    d = Diff(sorted(set(b) - set(a)), sorted(set(a) - set(b)))
    for name in sorted(set(a) & set(b)):
        what = [
            f"{f} {a[name].get(f, '-')} → {b[name].get(f, '-')}"
            for f in PRICE_FIELDS
            if a[name].get(f) != b[name].get(f)
        ]
        tools_a, tools_b = a[name].get(TOOL_CALLS, {}), b[name].get(TOOL_CALLS, {})
        what += [
            f"{TOOL_CALLS}.{k} {tools_a.get(k, '-')} → {tools_b.get(k, '-')}"
            for k in sorted(set(tools_a) | set(tools_b))
            if tools_a.get(k) != tools_b.get(k)
        ]
        if what:
            d.changed.append((name, what))
    return d


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` over `old`: entries and aliases of `new` win, the others of `old` are kept."""
    out = dict(new)
    out["models"] = {**old["models"], **new["models"]}
    out["aliases"] = {**old.get("aliases", {}), **new.get("aliases", {})}
    return out


def dumps(data: dict[str, Any]) -> str:
    """The catalogue as JSON with one model (and one alias) per line: readable, and a price
    change is a one-line diff."""
    head = {k: v for k, v in data.items() if k not in ("models", "aliases")}
    parts = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in head.items()]
    for key in ("models", "aliases"):
        rows = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in data.get(key, {}).items()]
        parts.append(f" {json.dumps(key)}: {{\n" + ",\n".join(rows) + "\n }")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    """Writes `data` so that a reader (or a crash) sees the old file or the new one, never a part."""
    replace_file(path, dumps(data).encode())
