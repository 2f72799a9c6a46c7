"""`edgeroute router calibrate|replay`: set a policy's threshold from a target, and
replay logged outcomes through a config's routing to see what cost and quality
would have been.

Both read outcome logs in the training format, one line per (prompt, model):
``{"prompt": ..., "model": ..., "score": 0..1, "cost_usd": ...}``. Predictions come
from the same Rust core the proxy runs, so what is calibrated is what will serve.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from edgeroute import config as config_mod
from edgeroute.core import Router, build_router


@dataclass
class Prompt:
    text: str
    outcomes: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (score, cost)


def load_outcomes(path: Path) -> list[Prompt]:
    by_text: dict[str, Prompt] = {}
    try:
        f = path.open()
    except OSError as e:
        raise SystemExit(f"edgeroute router: {path}: cannot read: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                p = by_text.setdefault(row["prompt"], Prompt(row["prompt"]))
                p.outcomes[row["model"]] = (float(row["score"]), float(row.get("cost_usd") or 0.0))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}:{n}: not an outcome line ({e})") from None
    return list(by_text.values())


def _scorer(router_model: str, task_model: str) -> Router:
    """A router with no routes of its own, used only for its predictions."""
    spec = {
        "providers": {"none": {"base_url": "http://127.0.0.1:9/v1"}},
        "deployments": {"d": {"provider": "none", "model": "m"}},
        "models": {"m": {"deployments": ["d"]}},
        "learning": {"router_model": router_model, "task_model": task_model},
    }
    cfg = config_mod.parse(spec, "<calibrate>", check_secrets=False)
    return build_router(cfg, "<calibrate>")


def _body(text: str, model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}]})


def calibrate(args: argparse.Namespace) -> int:
    prompts = [p for p in load_outcomes(args.outcomes) if args.strong in p.outcomes and args.weak in p.outcomes]
    if not prompts:
        print(f"no prompt has outcomes for both {args.strong!r} and {args.weak!r}", file=sys.stderr)
        return 2
    scorer = _scorer(args.router, args.task_model)
    weak_scores = []
    for p in prompts:
        scores = dict(scorer.decide(_body(p.text, "m"), explain=True).scores)
        if args.weak_output not in scores:
            print(
                f"the router model has no output {args.weak_output!r} (it has {sorted(scores)}); "
                "name the weak model's output with --weak-output, or pass the router trained on these "
                "outcomes with --router",
                file=sys.stderr,
            )
            return 2
        weak_scores.append(scores[args.weak_output])
    # A request goes to the strong model when the weak one's predicted score is below the threshold.
    candidates = [*sorted(set(weak_scores)), 1.0 + 1e-9]
    strong_q = sum(p.outcomes[args.strong][0] for p in prompts) / len(prompts)
    rows = []
    for t in candidates:
        strong_share = sum(1 for s in weak_scores if s < t) / len(prompts)
        quality = sum(
            p.outcomes[args.strong if s < t else args.weak][0] for p, s in zip(prompts, weak_scores, strict=True)
        ) / len(prompts)
        rows.append((t, strong_share, quality))
    if args.strong_share is not None:
        fit = [r for r in rows if r[1] <= args.strong_share]
        chosen = max(fit, key=lambda r: r[1]) if fit else rows[0]
    else:
        goal = args.keep_quality * strong_q
        fit = [r for r in rows if r[2] >= goal]
        chosen = min(fit, key=lambda r: r[1]) if fit else rows[-1]
    t, share, q = chosen
    print(f"prompts: {len(prompts)}; strong-only quality {strong_q:.4f}")
    print(f"threshold: {min(t, 1.0):.4f}  -> strong share {share:.1%}, quality {q:.4f} ({q / strong_q:.1%} of strong)")
    print(f"policy: {{threshold: {min(t, 1.0):.4f}, candidates: [...]}}")
    return 0


def replay(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, check_secrets=False)
    if args.model not in cfg.models:  # the core would refuse every prompt
        print(f"edgeroute router replay: {args.config} has no model {args.model!r}; name the public model "
              f"the requests ask for with --model (one of: {', '.join(cfg.models)})", file=sys.stderr)  # fmt: skip
        return 2
    router = build_router(cfg, args.config)
    prompts = load_outcomes(args.outcomes)
    model_of_route: dict[str, str] = {}
    for m in cfg.models.values():
        if m.policy is not None:
            for cand in m.policy.candidates:
                model_of_route.setdefault(cand.route, cand.model)
    for pair in args.map or []:
        route, _, model = pair.partition("=")
        model_of_route[route] = model
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # route -> [n, quality, cost]
    skipped = 0
    for p in prompts:
        d = router.decide(_body(p.text, args.model))
        outcome_model = model_of_route.get(d.route)
        if outcome_model is None or outcome_model not in p.outcomes:
            skipped += 1
            continue
        score, cost = p.outcomes[outcome_model]
        t = totals[d.route]
        t[0] += 1
        t[1] += score
        t[2] += cost
    n = sum(t[0] for t in totals.values())
    if not n:
        print("no prompt could be replayed (map routes to outcome models with --map ROUTE=MODEL)", file=sys.stderr)
        return 2
    quality = sum(t[1] for t in totals.values()) / n
    cost = sum(t[2] for t in totals.values())
    print(f"replayed {int(n)} prompts through model {args.model!r} ({skipped} skipped: no outcome for their route)")
    width = max(24, *(len(r) for r in totals), *(7 + len(m) for p in prompts for m in p.outcomes))
    print(f"{'route':{width}} {'share':>7} {'quality':>8} {'cost_usd':>12}")
    for route, (k, q, spent) in sorted(totals.items()):
        print(f"{route:{width}} {k / n:7.1%} {q / k:8.4f} {spent:12.6f}")
    print(f"{'policy total':{width}} {1:7.1%} {quality:8.4f} {cost:12.6f}")
    for model in sorted({m for p in prompts for m in p.outcomes}):
        have = [p.outcomes[model] for p in prompts if model in p.outcomes]
        q_all = sum(s for s, _ in have) / len(have)
        c_all = sum(c for _, c in have) / len(have) * n
        print(f"{'always ' + model:{width}} {'':7} {q_all:8.4f} {c_all:12.6f}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("calibrate", help="a policy threshold from a target strong share or quality")
    c.add_argument("--outcomes", type=Path, required=True)
    c.add_argument("--strong", required=True, help="the strong model's name in the outcomes")
    c.add_argument("--weak", required=True, help="the weak model's name in the outcomes")
    c.add_argument("--weak-output", help="the router model's output for the weak model (default: --weak)")
    c.add_argument("--router", default="builtin")
    c.add_argument("--task-model", default="builtin")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--strong-share", type=float, help="at most this share of calls to the strong model (0..1)")
    g.add_argument("--keep-quality", type=float, help="keep this share of the strong model's quality (0..1)")
    c.set_defaults(fn=calibrate)
    r = sub.add_parser("replay", help="replay logged outcomes through a config's routing")
    r.add_argument("--config", "-c", required=True)
    r.add_argument("--outcomes", type=Path, required=True)
    r.add_argument("--model", "-m", default="auto", help="the public model the requests ask for")
    r.add_argument("--map", action="append", help="ROUTE=MODEL: which outcome model a route stands for")
    r.set_defaults(fn=replay)


def main(argv: list[str]) -> int | None:
    """Handles `calibrate` and `replay`; None for other router subcommands."""
    if not argv or argv[0] not in ("calibrate", "replay"):
        return None
    p = argparse.ArgumentParser(prog="edgeroute router")
    add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    if args.command == "calibrate" and args.weak_output is None:
        args.weak_output = args.weak
    try:
        code: int = args.fn(args)
    except config_mod.ConfigError as e:  # the config (replay) or the router files (calibrate)
        print("\n".join(e.errors), file=sys.stderr)
        return 1
    return code
