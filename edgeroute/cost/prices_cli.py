"""`edgeroute prices list|show|update`: the price catalogue from the command line.

`update --from FILE` reads a catalogue in our format or LiteLLM's, checks every entry,
prints what changes, and (unless `--dry-run`) writes it atomically where the proxy reads
it (`edgeroute.config.prices.prices_path`); a running proxy prices by it after a reload.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgeroute.config import price_catalogue as pc
from edgeroute.config import prices

_MAX_SHOWN = 50  # problems printed of a bad file (a broken import can have thousands)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prices", help="list, show and update the price catalogue")
    cmds = p.add_subparsers(dest="prices_command", required=True)

    ls = cmds.add_parser("list", help="the catalogue's models and prices (USD per million tokens)")
    ls.add_argument("--provider", help="only this provider's models (e.g. openai, bedrock)")
    ls.add_argument("--format", default="table", choices=["table", "json"], help="output format")
    ls.set_defaults(fn=_list)

    sh = cmds.add_parser("show", help="one model's prices, date and source")
    sh.add_argument("model", help="a catalogue model name or alias (a provider/ prefix is allowed)")
    sh.set_defaults(fn=_show)

    up = cmds.add_parser("update", help="load a newer catalogue (ours or LiteLLM's JSON) after checking it")
    up.add_argument("--from", dest="source_file", required=True, type=Path, help="the catalogue JSON to load")
    up.add_argument("--dry-run", action="store_true", help="check and print the changes; write nothing")
    up.add_argument("--merge", action="store_true", help="keep models the file lacks (default: replace)")
    up.add_argument(
        "--source",
        help="for a LiteLLM file: where it came from, recorded in each entry (e.g. its URL at a commit)",
    )
    up.add_argument("--as-of", help="for a LiteLLM file: the date of its prices, YYYY-MM-DD (default: today, UTC)")
    up.add_argument(
        "--config",
        "-c",
        default=os.environ.get("EDGEROUTE_CONFIG") or None,
        help="refuse the update if this config's `price: catalogue` references would not resolve in it "
        "(default: $EDGEROUTE_CONFIG)",
    )
    up.add_argument("--force", action="store_true", help="write even if --config's references would break")
    up.set_defaults(fn=_update)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def _list(args: argparse.Namespace) -> int:
    try:
        cat = prices.catalogue()
    except pc.CatalogueError as err:
        return _fail(err.errors)
    rows = {k: e for k, e in cat["models"].items() if args.provider in (None, e["provider"])}
    if not rows and args.provider is not None:  # a typo, not an empty list
        known = ", ".join(sorted({e["provider"] for e in cat["models"].values()}))
        print(f"error: no model of provider {args.provider!r} in the catalogue (providers: {known})", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    print(f"# {prices.catalogue_file()} — USD per million tokens")
    cols = ("model", "provider", "input", "cached", "output", "batch in", "batch out", "as of")
    width = max([len(c) for c in rows] + [5])
    print(f"{cols[0]:<{width}}  {cols[1]:<10} " + " ".join(f"{c:>9}" for c in cols[2:7]) + f"  {cols[7]}")
    for name, e in sorted(rows.items(), key=lambda kv: (kv[1]["provider"], kv[0])):
        nums = (e["input"], e.get("cached_input"), e["output"], e.get("batch_input"), e.get("batch_output"))
        print(f"{name:<{width}}  {e['provider']:<10} " + " ".join(f"{_fmt(n):>9}" for n in nums) + f"  {e['as_of']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        key = prices.resolve_name(args.model)
        if key is None:
            return _fail([f"error: {prices.unknown_model(args.model)}"])
        e = prices.catalogue()["models"][key]
        aliases = sorted(a for a, t in prices.catalogue().get("aliases", {}).items() if t == key)
    except pc.CatalogueError as err:
        return _fail(err.errors)
    print(f"model:        {key}" + (f"  (asked for {args.model!r})" if key != args.model else ""))
    if aliases:
        print(f"aliases:      {', '.join(aliases)}")
    print(f"provider:     {e['provider']}" + (f" ({e['mode']})" if "mode" in e else ""))
    for f in pc.PRICE_FIELDS:
        if f in e:
            unit = "USD per request" if f == "per_request" else "USD per million tokens"
            print(f"{f + ':':<13} {e[f]:g} {unit}")
    for kind, each in sorted(e.get(pc.TOOL_CALLS, {}).items()):
        print(f"{kind + ':':<13} {each:g} USD a call")
    print(f"as of:        {e['as_of']}\nsource:       {e['source']}")
    if "note" in e:
        print(f"note:         {e['note']}")
    return 0


def _update(args: argparse.Namespace) -> int:
    try:
        raw = json.loads(args.source_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return _fail([f"error: {args.source_file}: cannot be read as JSON: {e}"])
    note = ""
    if pc.is_litellm(raw):
        as_of = args.as_of or dt.datetime.now(dt.UTC).date().isoformat()
        if not pc.is_date(as_of):
            return _fail([f"error: --as-of {as_of!r} is not a date (YYYY-MM-DD)"])
        source = args.source or f"LiteLLM model_prices_and_context_window.json ({args.source_file.name})"
        raw, skipped = pc.from_litellm(raw, source, as_of)
        note = f" (LiteLLM format: {len(raw['models'])} text and embedding models; {skipped} other entries skipped)"
    elif args.source or args.as_of:
        return _fail(["error: --source and --as-of are for LiteLLM files; a catalogue names them per entry"])
    try:
        new = pc.check(raw, str(args.source_file))
        current = prices.catalogue()
        if args.merge:
            new = pc.check(pc.merged(current, new), str(args.source_file))
    except pc.CatalogueError as e:
        shown = e.errors[:_MAX_SHOWN] + ([f"… {len(e.errors) - _MAX_SHOWN} more"] if len(e.errors) > _MAX_SHOWN else [])
        return _fail([*shown, f"{args.source_file}: not loaded ({len(e.errors)} problems)"])
    new.setdefault("format", pc.FORMAT)
    target = prices.prices_path()
    print(f"{args.source_file}{note} against {prices.catalogue_file()}:")
    for line in pc.diff(current, new).lines():
        print(line)
    broken = _broken_references(args.config, new) if args.config else []
    for line in broken:
        print(line, file=sys.stderr)
    if broken and not args.force and not args.dry_run:
        return _fail([f"{args.source_file}: not loaded: {args.config} would no longer load (--force writes anyway)"])
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    pc.write_atomically(target, new)
    print(f"wrote {target} ({len(new['models'])} models); a running proxy uses it after a reload (SIGHUP)")
    return 0


def _broken_references(config_path: str, cat: dict[str, Any]) -> list[str]:
    """The deployments of the config at `config_path` whose catalogue reference `cat` lacks,
    each as `edgeroute check` prints a problem (file:line:column: path: what)."""
    import yaml

    from edgeroute.config.source import load_yaml

    try:
        raw, where = load_yaml(Path(config_path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [f"error: {config_path}: cannot be read: {e}"]
    deployments = raw.get("deployments") if isinstance(raw, dict) else None
    out = []
    for name, d in (deployments if isinstance(deployments, dict) else {}).items():
        if not isinstance(d, dict):
            continue
        ref = prices.catalogue_name(d.get("price"), str(d.get("model", "")))
        if ref is not None and prices.resolve_name(ref, cat) is None:
            at = where.of(("deployments", name, "price"))
            place = f"{config_path}:{at[0]}:{at[1]}" if at else config_path
            out.append(f"{place}: deployments.{name}.price: model {ref!r} is not in the new catalogue")
    return out


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(line, file=sys.stderr)
    return 1
