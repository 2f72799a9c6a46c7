"""``edgeroute router train|eval``: learned routers from per-prompt outcomes.

``train --outcomes FILE.jsonl --out MODEL`` fits a router (one predicted score
per model) on lines ``{"prompt", "model", "score" in [0,1], "cost_usd"}``;
``eval --router MODEL --outcomes FILE.jsonl`` prints the cost-quality curve,
APGR, CPT(50%), CPT(80%) and the cost needed to match the best single model.
Evaluate on outcomes the router was not trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from edgeroute.learn import router as R
    from edgeroute.learn.model import LinearModel

    data = R.Outcomes.load(args.outcomes)
    if len(data.models) < 2:
        print("need outcomes of at least two models", file=sys.stderr)
        return 2
    task = LinearModel.load(args.task_model) if args.task_model else None
    model = R.train_router(data, task_model=task)
    args.out.write_bytes(model.to_bytes())
    print(
        f"trained router over {len(data.models)} models on {len(data.prompts)} prompts "
        f"-> {args.out} ({args.out.stat().st_size} bytes)"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from edgeroute.learn import router as R
    from edgeroute.learn.evaluate import multi_model_curve
    from edgeroute.learn.model import LinearModel

    model = LinearModel.load(args.router)
    data = R.Outcomes.load(args.outcomes)
    missing = [m for m in data.models if m not in model.outputs]
    if missing:
        print(f"router does not know models {missing}", file=sys.stderr)
        return 2
    task = LinearModel.load(args.task_model) if args.task_model else None
    pred = R.predict_scores(model, data.prompts, task_model=task)
    cols = [model.outputs.index(m) for m in data.models]
    pred = pred[:, cols]
    # only prompts observed for every model take part
    full = ~np.isnan(data.scores).any(axis=1)
    curve, match = multi_model_curve(pred[full].tolist(), data.scores[full].tolist(), data.costs, steps=args.steps)
    print(f"prompts={int(full.sum())} models={data.models}")
    print(f"mean cost/call: {dict(zip(data.models, data.costs, strict=True))}")
    print(f"quality: cheapest={curve.q_weak:.4f} best single={curve.q_strong:.4f}")
    print("cost_fraction  quality  PGR")
    shown = -1.0
    for c, q, p in zip(curve.cost, curve.quality, curve.pgr, strict=True):
        if c - shown >= 0.05 or c == 1.0:
            print(f"{c:12.3f}  {q:7.4f}  {p:5.3f}")
            shown = c
    print(f"APGR={curve.apgr():.3f} CPT(50%)={curve.cpt(0.5):.3f} CPT(80%)={curve.cpt(0.8):.3f}")
    if match is None:
        print("cost to match the best single model: not reached")
    else:
        print(f"cost to match the best single model: {match:.3f} of its cost")
    return 0


def main(argv: list[str]) -> int:
    """Entry point for ``edgeroute router ...`` (argv excludes ``router``)."""
    ap = argparse.ArgumentParser(prog="edgeroute router")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fit a router from per-prompt outcomes")
    t.add_argument("--outcomes", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--task-model", type=Path, help="use this task model's output as input")
    e = sub.add_parser("eval", help="cost-quality curve of a router on outcomes")
    e.add_argument("--router", type=Path, required=True)
    e.add_argument("--outcomes", type=Path, required=True)
    e.add_argument("--task-model", type=Path)
    e.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("edgeroute router needs numpy: pip install numpy", file=sys.stderr)
        return 2
    return int(_train(args) if args.cmd == "train" else _eval(args))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
