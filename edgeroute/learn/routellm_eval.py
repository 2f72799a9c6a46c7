"""``python -m edgeroute.learn.routellm_eval``: RouteLLM GPT-4 vs Mixtral, 5-fold CV by prompt.

Converts the RouteLLM per-prompt outcomes (GSM8K, MMLU; contaminated prompts
dropped) to the generic outcomes format, trains one router on the training
folds of both datasets, and scores the held-out fold. Each prompt's score is
``p(gpt-4 correct) - p(mixtral correct)``; the curves are per dataset.

No test-fold information reaches training: the router sees only training-fold
outcomes. Prompts are weighted by ``1/sqrt(size of their dataset)`` so that
GSM8K is not drowned by MMLU (:func:`edgeroute.learn.router.source_weights`).
The text features are the hashed n-grams and length, so any
"subject" or "dataset" prior is whatever the n-grams learn from training folds.

``--write-outcomes FILE`` writes the converted outcomes (for ``router train``).

``--nested`` is the honest figure (:func:`nested_figure`): per dataset, 5 outer folds;
in each, the router's settings are chosen by ``router train``'s own inner
cross-validation (:mod:`edgeroute.learn.selection`) on the training folds only, and
the held-out fold is scored once. Printed beside it on the same folds: the prior
(per-subject for MMLU, prompt-blind for GSM8K) and TF-IDF logistic regression
(:mod:`edgeroute.learn.baselines`). The protocol is fixed here, before any test
fold is read.

Since 2026-12-04 the inner folds also choose the feature set (``router train --features``,
:data:`edgeroute.learn.selection.FEATURE_SETS`: ``ngrams``, the task model's, and
``words``, word uni/bigrams of up to 4 KiB + 256 B). That candidate set was fixed, and
committed with this paragraph, before any fold was scored with it; the outer folds,
seeds and grids are unchanged, so the figure is comparable with the earlier runs, and
``--features ngrams`` reproduces them.

Since 2026-12-04 (later) the feature sets include ``words-tfidf`` (tf-idf weighted words,
see :mod:`edgeroute.learn.selection`, whose module doc fixed that candidate set and the
protocol, committed before this figure was run once per dataset).

Since 2026-12-04 (later still) the candidates include ``words-tfidf-df2``, ``ngrams-tfidf``
and L2 1e-4: a second look at the outer folds (the set was extended after the
``words-tfidf`` figure was seen); the set and the rule are in :mod:`edgeroute.learn.selection`'s
module doc, committed before this figure was run once per dataset.

``--nested --families`` adds one row, "inner-CV choice": in each outer fold the inner
folds (the same ones ``router train`` splits the outer-training part into) also score the
group prior and TF-IDF LR, fitted on each inner-training part; the predictor with the best
mean inner APGR among all of them (ties: the one listed first of prompt-blind prior, group
prior, TF-IDF LR, then the n-gram grid) is refitted on the whole outer-training part and
scored once on the outer fold. No outer-fold score enters a choice. This measures model
selection across families; a chosen group prior (it needs the MMLU subject) or TF-IDF LR
is not a file ``router train`` writes or the core loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgeroute.learn import data
from edgeroute.learn import router as R
from edgeroute.learn import train as T
from edgeroute.learn.evaluate import two_model_curve
from edgeroute.learn.flags import feature_sets as _feature_sets
from edgeroute.learn.flags import floats as _floats
from edgeroute.learn.flags import ints as _ints

# Nominal per-call prices (USD) for the outcomes file; the RouteLLM figures use
# the share of strong calls, which does not depend on them.
PRICES = {data.STRONG: 0.01, data.WEAK: 0.0006}
DATASETS = ("gsm8k", "mmlu")
# Few, large Adam steps and a firm L2: both regularise (GSM8K difficulty is a weak
# signal that more steps overfit), and the 5-fold figure trains in seconds.
FIT = T.FitOptions(l2=3e-3, iters=50, lr=0.1)


def routellm_outcomes() -> tuple[R.Outcomes, list[str]]:
    """Prompts x [strong, weak] outcomes, and the dataset of each prompt."""
    prompts: list[str] = []
    which: list[str] = []
    rows: list[list[float]] = []
    for p, s, w in data.load_gsm8k():
        prompts.append(p)
        which.append("gsm8k")
        rows.append([s, w])
    for p, _subject, s, w in data.load_mmlu():
        prompts.append(p)
        which.append("mmlu")
        rows.append([s, w])
    out = R.Outcomes(prompts, [data.STRONG, data.WEAK], np.asarray(rows), [PRICES[data.STRONG], PRICES[data.WEAK]])
    return out, which


def outcome_rows(out: R.Outcomes) -> list[dict[str, object]]:
    return [
        {"prompt": p, "model": m, "score": float(out.scores[i, j]), "cost_usd": out.costs[j]}
        for i, p in enumerate(out.prompts)
        for j, m in enumerate(out.models)
    ]


def cross_validate(folds: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
    out, which = routellm_outcomes()
    cfg = R.ROUTER_FEATURIZER
    x = T.featurize(out.prompts, cfg)
    dense = T.length_matrix(out.prompts)
    score = np.zeros(len(out.prompts))
    for test in R.kfold(len(out.prompts), folds, seed):
        held = set(test)
        tr = [i for i in range(len(out.prompts)) if i not in held]
        # weights from the training folds only
        sw = R.source_weights([which[i] for i in tr])
        model = R.train_router(out.subset(tr), cfg=cfg, x=x.subset(tr), dense=dense[tr], opts=FIT, sample_weight=sw)
        p = R.predict_scores(model, [out.prompts[i] for i in test], x=x.subset(test), dense=dense[test])
        score[test] = p[:, 0] - p[:, 1]
    results: dict[str, dict[str, float]] = {}
    ds = np.asarray(which)
    for name in DATASETS:
        idx = np.where(ds == name)[0]
        c = two_model_curve(score[idx].tolist(), out.scores[idx, 0].tolist(), out.scores[idx, 1].tolist())
        results[name] = {
            "n": float(len(idx)),
            "apgr": c.apgr(),
            "cpt50": c.cpt(0.5),
            "cpt80": c.cpt(0.8),
            "q_strong": c.q_strong,
            "q_weak": c.q_weak,
        }
    return results


GROUP_PRIOR = "group prior"
TFIDF_LR = "TF-IDF LR"


def _family_choice(
    out: R.Outcomes,
    prompts: list[str],
    grp: list[str],
    tr: list[int],
    router_means: dict[Any, float],
    sp: object,
) -> str:
    """The label of the predictor with the best mean inner-fold APGR over `tr` (see the module doc)."""
    from edgeroute.learn import baselines as B
    from edgeroute.learn import selection as S

    assert isinstance(sp, S.SearchSpace)
    costs = np.asarray(out.costs)
    inner = S.inner_folds(tr, sp)
    extra: dict[str, list[float]] = {GROUP_PRIOR: [], TFIDF_LR: []}
    for k, val in enumerate(inner):
        itr = [i for j, f in enumerate(inner) if j != k for i in f]
        gp = B.group_prior([grp[i] for i in itr], out.scores[itr], [grp[i] for i in val])
        lr = B.tfidf_lr([prompts[i] for i in itr], out.scores[itr], [prompts[i] for i in val])
        for name, pred in ((GROUP_PRIOR, gp), (TFIDF_LR, lr)):
            extra[name].append(S.score(pred, out.scores[val], costs, "apgr", sp.steps))
    means = {c.label(): v for c, v in router_means.items()}
    means |= {name: float(np.mean(v)) for name, v in extra.items()}
    order = [S.Candidate(S.PRIOR).label(), GROUP_PRIOR, TFIDF_LR] + [c.label() for c in sp.candidates()[1:]]
    return max(order, key=lambda c: (means.get(c, float("-inf")), -order.index(c)))


def nested_figure(
    folds: int = 5,
    seed: int = 0,
    space: object = None,
    log: bool = True,
    datasets: tuple[str, ...] = DATASETS,
    families: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """{dataset: {method: {apgr, cpt50, cpt80}}} for router / prior / TF-IDF LR on the same folds
    (and, with `families`, the inner-CV choice among all of them: method "selected")."""
    from edgeroute.learn import baselines as B
    from edgeroute.learn import selection as S

    sp = space if isinstance(space, S.SearchSpace) else S.SearchSpace(outer_folds=folds, seed=seed)
    sets: dict[str, tuple[list[str], list[str], list[list[float]]]] = {
        "gsm8k": ([p for p, _, _ in data.load_gsm8k()], [], [[s, w] for _, s, w in data.load_gsm8k()]),
        "mmlu": ([p for p, *_ in data.load_mmlu()], [g for _, g, _, _ in data.load_mmlu()],
                 [[s, w] for _, _, s, w in data.load_mmlu()]),
    }  # fmt: skip
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, (prompts, groups, rows) in sets.items():
        if name not in datasets:
            continue
        out = R.Outcomes(prompts, [data.STRONG, data.WEAK], np.asarray(rows), [PRICES[data.STRONG], PRICES[data.WEAK]])
        grp = groups or ["all"] * len(prompts)
        xs = S.featurize_sets(prompts, sp.features)
        dense = T.length_matrix(prompts)
        methods = ("router", "prior", "tfidf_lr") + (("selected",) if families else ())
        per_fold: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
        for k, test in enumerate(R.kfold(len(prompts), folds, seed)):
            held = set(test)
            tr = [i for i in range(len(prompts)) if i not in held]
            chosen, router_means = S.select(out, xs, dense, tr, sp, "apgr")
            # Every choice is made before the outer fold is read below.
            pick = _family_choice(out, prompts, grp, tr, router_means, sp) if families else None
            model = S.fit_candidate(out, chosen, xs, dense, tr, sp, None)
            p = T.predict_matrix(model, S.model_features(xs, chosen, model, test), dense[test])
            gp = B.group_prior([grp[i] for i in tr], out.scores[tr], [grp[i] for i in test])
            lr = B.tfidf_lr([prompts[i] for i in tr], out.scores[tr], [prompts[i] for i in test])
            preds = [("router", p), ("prior", gp), ("tfidf_lr", lr)]
            if pick is not None:  # a pick from the n-gram grid or the prompt-blind prior is `chosen` itself
                preds.append(("selected", {GROUP_PRIOR: gp, TFIDF_LR: lr}.get(pick, p)))
                assert pick in (GROUP_PRIOR, TFIDF_LR) or pick == chosen.label(), (pick, chosen)
            # each fold is scored on its own: a prior's constant differs between folds, so
            # pooling the folds' scores into one ranking would be an artefact
            for method, pred in preds:
                c = two_model_curve(
                    (pred[:, 0] - pred[:, 1]).tolist(), out.scores[test, 0].tolist(), out.scores[test, 1].tolist()
                )
                per_fold[method].append((c.apgr(), c.cpt(0.5), c.cpt(0.8)))
            if log:
                row = "  ".join(f"{m} {v[-1][0]:.3f}" for m, v in per_fold.items())
                also = f", across families {pick}" if pick is not None else ""
                print(f"{name} fold {k + 1}/{folds}: chose {chosen.label()}{also}; APGR {row}", flush=True)
        results[name] = {
            method: {
                "apgr": float(np.mean([v[0] for v in vals])),
                "cpt50": float(np.mean([v[1] for v in vals])),
                "cpt80": float(np.mean([v[2] for v in vals])),
                "n": len(prompts),
            }
            for method, vals in per_fold.items()
        }
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeroute.learn.routellm_eval")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-outcomes", type=Path)
    ap.add_argument("--nested", action="store_true", help="nested CV figure with the baselines beside it")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="with --nested: which (comma-separated)")
    ap.add_argument("--l2", type=_floats, default=None, help="with --nested: router train's --l2")
    ap.add_argument("--iters", type=_ints, default=None, help="with --nested: router train's --iters")
    ap.add_argument("--inner-folds", type=int, default=None, help="with --nested: router train's --inner-folds")
    ap.add_argument("--features", type=_feature_sets, default=None, help="with --nested: router train's --features")
    ap.add_argument(
        "--families",
        action="store_true",
        help="with --nested: also the inner folds' choice among the n-gram grid, the priors and TF-IDF LR",
    )
    args = ap.parse_args(argv)
    if not data.have_data():
        print(f"no data at {data.data_root()}", file=sys.stderr)
        return 2
    if args.write_outcomes:
        out, _ = routellm_outcomes()
        with args.write_outcomes.open("w", encoding="utf-8") as f:
            for row in outcome_rows(out):
                f.write(json.dumps(row) + "\n")
        print(f"wrote {args.write_outcomes}")
        return 0
    if args.nested:
        prior_name = {"gsm8k": "prompt-blind prior", "mmlu": "per-subject prior"}
        from edgeroute.learn import selection as S

        sp = S.SearchSpace(outer_folds=args.folds, seed=args.seed)
        if args.l2:
            sp.l2 = args.l2
        if args.iters:
            sp.iters = args.iters
        if args.inner_folds:
            sp.inner_folds = args.inner_folds
        if args.features:
            sp.features = args.features
        print(
            f"search space: features={list(sp.features)} l2={list(sp.l2)} iters={list(sp.iters)} "
            f"inner folds={sp.inner_folds}",
            flush=True,
        )
        fig = nested_figure(args.folds, args.seed, sp, datasets=tuple(args.datasets.split(",")), families=args.families)
        print(
            f"nested {args.folds}-fold CV by prompt, per dataset, decontaminated; "
            "settings chosen inside each fold; mean over folds"
        )
        for name, rows in fig.items():
            for method, r in rows.items():
                label = {"router": "router (router train's selection)", "prior": prior_name[name],
                         "tfidf_lr": "TF-IDF logistic regression",
                         "selected": "inner-CV choice across families"}[method]  # fmt: skip
                print(
                    f"{name:6s} n={r['n']:<6d} {label:36s} APGR={r['apgr']:.3f} "
                    f"CPT(50%)={r['cpt50']:.3f} CPT(80%)={r['cpt80']:.3f}"
                )
        return 0
    res = cross_validate(args.folds, args.seed)
    print(f"{args.folds}-fold CV by prompt, decontaminated; score = p(strong) - p(weak)")
    for name, r in res.items():
        print(
            f"{name:6s} n={int(r['n'])} strong={r['q_strong']:.3f} weak={r['q_weak']:.3f}  "
            f"APGR={r['apgr']:.3f} CPT(50%)={r['cpt50']:.3f} CPT(80%)={r['cpt80']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
