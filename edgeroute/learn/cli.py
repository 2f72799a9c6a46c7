"""``edgeroute router train|eval``: learned routers from per-prompt outcomes.

``train --outcomes FILE.jsonl --out MODEL`` fits a router (one predicted score
per model) on lines ``{"prompt", "model", "score" in [0,1], "cost_usd"}``, choosing
its own settings by nested cross-validation on that file only
(:mod:`edgeroute.learn.selection`); ``eval --router MODEL --outcomes FILE.jsonl``
prints the router's cost-quality frontier beside the baselines on the same prompts
(best single model, cheapest, prompt-blind prior, random mixing, oracle). Evaluate on
outcomes the router was not trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgeroute.learn.flags import feature_sets as _feature_sets
from edgeroute.learn.flags import floats as _floats
from edgeroute.learn.flags import ints as _ints

if TYPE_CHECKING:
    from edgeroute.learn.model import LinearModel


def _load_model(path: Path, what: str) -> LinearModel:
    from edgeroute.learn.model import LinearModel

    if not path.is_file():
        raise SystemExit(f"edgeroute router: {what} file not found: {path}")
    try:
        return LinearModel.load(path)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise SystemExit(f"edgeroute router: {path} is not a router model file ({type(e).__name__}: {e})") from None


def _load_outcomes(path: Path):  # type: ignore[no-untyped-def]
    from edgeroute.learn import router as R

    return R.Outcomes.from_rows(_read_rows(path))


def _read_rows(path: Path) -> list[dict[str, object]]:
    from edgeroute.learn import router as R

    if not path.is_file():
        raise SystemExit(f"edgeroute router: outcomes file not found: {path}")
    try:
        return R.read_rows(path)
    except R.BadOutcomes as e:
        lines = "\n  ".join(e.problems[:50])
        more = f"\n  ... {len(e.problems) - 50} more" if len(e.problems) > 50 else ""
        raise SystemExit(f"edgeroute router: {path}: {len(e.problems)} bad row(s)\n  {lines}{more}") from None


def _rows_from_log(args: argparse.Namespace) -> list[dict[str, object]] | None:
    """The request log's rated requests as outcome rows (None after saying why there are none)."""
    import time

    from edgeroute import config as config_mod
    from edgeroute.cost.reports import open_backend
    from edgeroute.learn import from_log
    from edgeroute.requestlog.query import BadParam, parse_time

    try:
        since = parse_time("since", args.since, time.time()) if args.since else 0.0
    except BadParam as e:
        print(f"edgeroute router: --since: {str(e).split(': ', 1)[-1]}", file=sys.stderr)
        return None
    db = open_backend(args.config)
    if db is None:
        return None
    try:
        found = from_log.read(db, config_mod.load(args.config, check_secrets=False), since)
    finally:
        db.close()
    print(f"request log: {found.explain()}")
    if (hint := found.hint()) is not None and not args.outcomes:
        print(f"edgeroute router: nothing to train on: {hint}", file=sys.stderr)
        return None
    return found.rows


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S

    rows: list[dict[str, object]] = []
    if args.from_log:
        logged = _rows_from_log(args)
        if logged is None:
            return 2
        rows += logged
    if args.outcomes:
        rows += _read_rows(args.outcomes)
    if args.export_outcomes:
        args.export_outcomes.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} outcome rows to {args.export_outcomes}")
    data = R.Outcomes.from_rows(rows)
    if len(data.models) < 2:
        print(f"edgeroute router: need outcomes of at least two models (have {data.models})", file=sys.stderr)
        return 2
    folds = max(args.inner_folds, args.outer_folds)
    if len(data.prompts) < 2 * folds:
        print(f"edgeroute router: {len(data.prompts)} prompts are too few for {folds} folds", file=sys.stderr)
        return 2
    task = _load_model(args.task_model, "task model") if args.task_model else None
    space = S.SearchSpace(
        l2=args.l2,
        iters=args.iters,
        features=args.features,
        lr=args.lr,
        inner_folds=args.inner_folds,
        outer_folds=args.outer_folds,
        seed=args.seed,
        jobs=args.jobs,
    )
    print(f"{len(data.prompts)} prompts, {len(data.models)} models; seed {args.seed}")
    xs = S.featurize_sets(data.prompts, space.features)
    # the task model's inputs, if one of the sets is its featurizer (else featurized anew)
    x_task = next((x for n, x in xs.items() if task is not None and S.FEATURE_SETS[n] == task.featurizer
                   and n not in S.TFIDF_SETS), None)  # fmt: skip
    dense, _ = R.dense_inputs(data.prompts, task, x_task)
    np.random.seed(args.seed)
    model, rep = S.nested(data, xs, dense, space, task)
    print(f"validation ({rep.criterion}, mean over {space.inner_folds} inner folds of the whole file):")
    prior_v = rep.validation.get(S.PRIOR, float("nan"))
    for label, v in sorted(rep.validation.items(), key=lambda kv: -kv[1]):
        mark = " <- chosen" if label == rep.chosen.label() else ""
        print(f"  {label:32s} {v:.4f}  ({v - prior_v:+.4f} vs prior){mark}")
    if rep.outer_router:
        r, p = float(np.mean(rep.outer_router)), float(np.mean(rep.outer_prior))
        print(
            f"outer estimate ({space.outer_folds} folds, each selecting on its own training part): "
            f"{rep.criterion} router {r:.4f}, prompt-blind prior {p:.4f}"
        )
    if rep.fell_back:
        print("the chosen linear model was worse than the prompt-blind prior on the outer folds: shipping the prior")
    elif rep.chosen.family == S.PRIOR:
        print("no linear model beat the prompt-blind prior on validation: shipping the prior")
    model.meta.update(
        {
            "kind": "router",
            "costs": dict(zip(data.models, data.costs, strict=True)),
            "prior": dict(zip(data.models, [float(v) for v in S.prior_means(data)], strict=True)),
            "selection": rep.meta(),
            "train": {
                "prompts": len(data.prompts),
                "seed": args.seed,
                "l2": list(args.l2),
                "iters": list(args.iters),
                "features": list(args.features),
                "lr": args.lr,
                "inner_folds": args.inner_folds,
                "outer_folds": args.outer_folds,
            },
        }
    )
    model.save(args.out)
    print(f"chose {rep.chosen.label()} -> {args.out} ({args.out.stat().st_size} bytes)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from edgeroute.learn import frontier as FR
    from edgeroute.learn import router as R

    model = _load_model(args.router, "router")
    if model.activation != "sigmoid":
        print(f"edgeroute router: {args.router} is a task classifier, not a router", file=sys.stderr)
        return 2
    data = _load_outcomes(args.outcomes)
    missing = [m for m in data.models if m not in model.outputs]
    if missing:
        print(f"edgeroute router: the router does not know models {missing}", file=sys.stderr)
        return 2
    task = _load_model(args.task_model, "task model") if args.task_model else None
    if "task" in model.dense and task is None:
        print("edgeroute router: this router needs --task-model (the task model it was trained with)", file=sys.stderr)
        return 2
    pred = R.predict_scores(model, data.prompts, task_model=task)[:, [model.outputs.index(m) for m in data.models]]
    full = ~np.isnan(data.scores).any(axis=1)  # only prompts observed for every model take part
    if not full.any():
        print("edgeroute router: no prompt has an outcome for every model", file=sys.stderr)
        return 2
    actual, pred = data.scores[full], pred[full]
    costs = np.asarray(data.costs)
    ref = FR.Reference.of(data.models, actual, costs)
    c_best = float(costs[ref.best])
    prior_src = model.meta.get("prior")
    if isinstance(prior_src, dict) and all(m in prior_src for m in data.models):
        prior = np.asarray([float(prior_src[m]) for m in data.models])
        prior_name = "prompt-blind prior (training means)"
    else:
        prior = actual.mean(axis=0)
        prior_name = "prompt-blind prior (this set's means: optimistic)"
    curves = [
        ("router", FR.router_frontier(pred, actual, costs, args.steps)),
        (prior_name, FR.router_frontier(np.tile(prior, (len(actual), 1)), actual, costs, args.steps)),
        ("random mixing (best/cheapest)", FR.random_mix(ref)),
        (f"best single: {data.models[ref.best]}", FR.single(ref, ref.best)),
        (f"cheapest: {data.models[ref.cheapest]}", FR.single(ref, ref.cheapest)),
        ("oracle (upper bound)", FR.oracle(actual, costs)),
    ]

    def frac(c: float) -> str:
        return f"{c / c_best:.3f}" if c_best > 0 else "n/a"

    print(f"prompts={len(actual)} (observed for every model; {int((~full).sum())} skipped) models={len(data.models)}")
    print(f"{'model':40s} {'$/1k req':>10s} {'cost/best':>9s} {'quality':>8s}")
    for m, name in enumerate(data.models):
        print(f"{name[:40]:40s} {1000 * costs[m]:10.4f} {frac(float(costs[m])):>9s} {ref.quality[m]:8.4f}")
    why = ref.apgr_undefined()
    if why:
        print(f"APGR, CPT: undefined ({why})")
    if c_best <= 0:
        print("no cost_usd in the outcomes: cost columns are not available")
    print(f"\n{'method':40s} {'APGR':>6s} {'CPT50':>6s} {'CPT80':>6s}  cost to match best (cost/best, $/1k)")
    for name, f in curves:
        # a single model is one operating point, not a curve: no area to report
        one = name.startswith(("best single", "cheapest"))
        apgr, c50, c80 = (None, None, None) if one else (f.apgr(ref), f.cpt(ref, 0.5), f.cpt(ref, 0.8))
        match = f.cost_to_match_best(ref)
        shown = "not reached" if match is None else f"{frac(match)}, {1000 * match:.4f}"
        cells = [("-" if v is None else f"{v:.3f}") for v in (apgr, c50, c80)]
        print(f"{name[:40]:40s} {cells[0]:>6s} {cells[1]:>6s} {cells[2]:>6s}  {shown}")
    print(f"\nrouter frontier (measured points only):\n{'cost/best':>9s} {'$/1k req':>10s} {'quality':>8s}")
    f = curves[0][1]
    shown_c = -1.0
    for c, q in zip(f.cost, f.quality, strict=True):
        if c_best <= 0 or c / c_best - shown_c >= 0.05:
            print(f"{frac(float(c)):>9s} {1000 * c:10.4f} {q:8.4f}")
            shown_c = c / c_best if c_best > 0 else 0.0
    if args.plot:
        from edgeroute.learn.plot import svg

        scale = c_best if c_best > 0 else 1.0
        series = [(n, (fr.cost / scale).tolist(), fr.quality.tolist()) for n, fr in curves]
        x_label = "cost (fraction of the best model's cost)" if c_best > 0 else "cost (no cost_usd given)"
        args.plot.write_text(svg(series, title=f"{args.outcomes.name}: cost-quality", x_label=x_label))
        print(f"wrote {args.plot}")
    return 0


def _shadow(args: argparse.Namespace) -> int:
    import time

    import orjson

    from edgeroute import config as config_mod
    from edgeroute.cost.reports import open_backend
    from edgeroute.requestlog.query import BadParam
    from edgeroute.router_shadow import evaluator, report

    try:
        cfg = config_mod.load(args.config, check_secrets=False)
        found = evaluator.configured(cfg, args.config)
    except Exception as e:  # config and file errors: one line each, not a traceback
        print(f"edgeroute router shadow: {e}", file=sys.stderr)
        return 2
    db = open_backend(args.config)
    if db is None:
        return 2
    q = {k: v for k in ("since", "until", "candidate") if (v := getattr(args, k))}
    try:
        current = evaluator.candidate_name(*found) if found is not None else None
        body = report.build(db, q, current, time.time())
    except BadParam as e:
        # Name the flag only when it was given: without --candidate, the config names none.
        flag = f"--{e.param}: " if getattr(args, e.param, None) else ""
        print(f"edgeroute router shadow: {flag}{str(e).split(': ', 1)[-1]}", file=sys.stderr)
        return 2
    finally:
        db.close()
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() if args.format == "json" else report.table(body))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgeroute router")
    # calibrate and replay have a parser of their own (policy_tools); the usage names all five.
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{train,eval,calibrate,replay,shadow}")
    t = sub.add_parser(
        "train",
        help="fit a router from per-prompt outcomes, settings chosen by nested cross-validation",
        description="Fit a router; the settings are chosen by cross-validation on --outcomes only. "
        "The prompt-blind prior (each model's mean score) is always a candidate, so the "
        "router shipped is never worse than it on validation.",
    )
    t.add_argument("--outcomes", type=Path, help="JSON lines {prompt, model, score, cost_usd}")
    t.add_argument(
        "--from-log",
        action="store_true",
        help="train on the request log's rated requests (POST /v1/feedback scores joined to the logged "
        "prompts; needs request_log.log_content), with --outcomes rows too if given",
    )
    t.add_argument(
        "-c",
        "--config",
        default=os.environ.get("EDGEROUTE_CONFIG", "edgeroute.yaml"),
        help="with --from-log: the config whose ledger database holds the request log "
        "(default $EDGEROUTE_CONFIG, else edgeroute.yaml)",
    )
    t.add_argument("--since", help="with --from-log: feedback given since (epoch seconds, 24h, 7d, an ISO date)")
    t.add_argument("--export-outcomes", type=Path, metavar="FILE", help="also write the training rows as JSON lines")
    t.add_argument("--out", type=Path, required=True, help="router model file to write")
    t.add_argument("--task-model", type=Path, help="use this task model's probabilities as extra inputs")
    t.add_argument("--l2", type=_floats, default=[1e-4, 3e-4, 3e-3, 3e-2], help="L2 strengths to try (comma-separated)")
    t.add_argument(
        "--iters",
        type=_ints,
        default=[25, 50, 100, 200],
        help="Adam iteration counts read off each run for early stopping (comma-separated)",
    )
    t.add_argument(
        "--features",
        type=_feature_sets,
        default=["ngrams", "words", "words-tfidf", "words-tfidf-df2", "ngrams-tfidf"],
        help="feature sets to try (comma-separated): ngrams = word uni/bigrams and character 4-grams "
        "of the first 1 KiB and last 256 B (the task model's, one pass for both); words = word "
        "uni/bigrams of the first 4 KiB and last 256 B; words-tfidf = the same words, tf-idf "
        "weighted (sublinear tf, idf of the training prompts stored in the file, L2-normalised); "
        "words-tfidf-df2 = the same in 2^18 buckets, a bucket in fewer than 2 training prompts "
        "ignored; ngrams-tfidf = ngrams' tokens weighted and cut the same way",
    )
    t.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    t.add_argument("--inner-folds", type=int, default=3, help="folds that choose the settings (>= 2)")
    t.add_argument(
        "--outer-folds", type=int, default=5, help="folds of the honest outer estimate (0 or 1: skip the estimate)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of every fold split and shuffle")
    t.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes for the cross-validation fits (default 0: every core, for files of "
        "2,000 prompts or more); the router written does not depend on it",
    )
    e = sub.add_parser("eval", help="router vs baselines on outcomes (cost-quality, APGR, CPT)")
    e.add_argument("--router", type=Path, required=True, help="router model file")
    e.add_argument("--outcomes", type=Path, required=True, help="outcomes the router was NOT trained on")
    e.add_argument("--task-model", type=Path, help="the task model the router was trained with, if any")
    e.add_argument("--steps", type=int, default=200, help="points on the willingness-to-pay sweep")
    e.add_argument("--plot", type=Path, metavar="FILE.svg", help="write the cost-quality curves as SVG")
    s = sub.add_parser(
        "shadow",
        help="a candidate router against the running one on live traffic (learning.candidate_router)",
        description="Agreement, estimated cost of both routers' choices and feedback quality, from the "
        "request log's database the config names (the same report as GET /admin/router/shadow).",
    )
    s.add_argument("-c", "--config", default=os.environ.get("EDGEROUTE_CONFIG", "edgeroute.yaml"), help="config file")
    s.add_argument("--since", default="24h", help="from (epoch seconds, 15m, 24h, 7d, an ISO date)")
    s.add_argument("--until", help="up to (default now)")
    s.add_argument("--candidate", help="a candidate as the report lists it (default: the configured one)")
    s.add_argument("--format", choices=("table", "json"), default="table")
    return ap


def main(argv: list[str]) -> int:
    """Entry point for ``edgeroute router ...`` (argv excludes ``router``)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "shadow":
        return _shadow(args)
    if args.cmd == "train" and not args.outcomes and not args.from_log:
        ap.error("train needs --outcomes FILE, --from-log, or both")
    if args.cmd == "train" and args.inner_folds < 2:
        ap.error("--inner-folds must be at least 2")
    if args.cmd == "train" and not args.l2:
        ap.error("--l2 needs at least one value")
    if args.cmd == "eval" and args.steps < 1:
        ap.error("--steps must be at least 1")
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("edgeroute router needs numpy: pip install 'edgeroute[train]'", file=sys.stderr)
        return 2
    return int(_train(args) if args.cmd == "train" else _eval(args))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
