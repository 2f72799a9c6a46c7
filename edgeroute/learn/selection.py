"""How ``router train`` chooses its own settings: nested cross-validation on the training file only.

Candidates are the **prompt-blind prior** (each model's mean score: a router that
ignores the prompt) and the hashed linear model for each feature set (:data:`FEATURE_SETS`)
at each L2 strength, read at several iteration counts of one run (early stopping on each
validation fold). The feature sets are ``ngrams`` and ``words`` (count weighting: each
bucket's count over the square root of the number of buckets) and, since 2026-12-04,
``words-tfidf``: the word uni- and bigrams of ``words`` in 2^17 buckets with **tf-idf
weighting** (sublinear term frequency ``1 + ln count``, smoothed inverse document
frequency from the fit's own training prompts, stored in the model file, each prompt's
vector L2-normalised; see :mod:`edgeroute.learn.model`). The idf of every fit is
computed on that fit's training rows only (an inner-training part for a validation
score, the outer-training part for an outer score, the whole file for the shipped model).
The inner folds pick the candidate with the best validation criterion; the outer folds,
each selecting on its own training part only, estimate how the whole procedure does
on prompts it has never seen, beside the prior fitted on the same folds.

The criterion is the area under the validation cost-quality frontier (APGR, see
:mod:`edgeroute.learn.frontier`); where APGR is undefined (the best model is also
the cheapest) it is the mean observed score of the model the router would pick
first (quality only). Logged traffic (``router train --from-log``) holds one model's
outcome per prompt, so there is no frontier to measure: there the criterion is the
Brier score of the predicted scores on the observed cells (lower error is better).
Folds, shuffles and Adam's start are fixed by one seed.

Why ``words-tfidf``: on MMLU the nested figure put TF-IDF logistic regression
(:mod:`edgeroute.learn.baselines`) above the hashed model. Measured on the inner folds of
one outer fold's training part only (mean validation APGR of 3 inner folds, L2 3e-4,
the outer fold never read): exact-vocabulary TF-IDF LR 0.675; hashed words as counts
0.656; the same with sublinear tf and L2 normalisation 0.664; raw tf with idf 0.666;
sublinear tf with idf 0.671 at 2^15 buckets, 0.672 at 2^16, 0.673 at 2^17, 0.675 at
2^18. The weighting explains most of the gap, hash collisions the rest; more Adam steps
(400) or a weaker L2 (1/n, TF-IDF LR's) changed nothing (validation APGR is flat after
50-100 steps). The candidate set (``ngrams``, ``words``, ``words-tfidf`` x L2 {3e-4,
3e-3, 3e-2} x steps {25, 50, 100, 200}, 3 inner folds, 5 outer folds, seed 0) was fixed
and committed with this paragraph before any outer fold was scored with it.

Second tf-idf round (2026-12-04, late; a **second look at the outer folds**: this candidate
set was extended after the nested figure with ``words-tfidf`` had been seen, MMLU 0.690
APGR against TF-IDF LR's 0.694). How TF-IDF LR (:func:`edgeroute.learn.baselines.tfidf_lr`)
still differs from ``words-tfidf``: an exact vocabulary (no collisions); ``min_df`` 2, so a
word or bigram in fewer than 2 training prompts, and every word a test prompt has that no
training prompt had, is dropped from the vector *and its norm* (``words-tfidf`` gives an
unseen bucket the highest idf, which only dilutes a test prompt's known words); an L2 of
1/n (about 1e-4 here, below the grid's 3e-4 edge, where the inner folds kept choosing
3e-4); word (``\\w+``) tokens of the whole text (no punctuation tokens, no 4 KiB cut); no length
inputs. Measured on the same inner folds of the same outer fold's training part as above
(mean validation APGR, 3 inner folds, the outer fold never read; best step count): TF-IDF
LR 0.675; ``words-tfidf`` 2^17 0.674 (L2 3e-4); 2^18 0.675; 2^17 with the ``min_df`` 2 cut
0.673, with only unseen buckets dropped 0.674; 2^18 with the cut 0.676, and at L2 1e-4
0.679 (3e-5: 0.670); the same without length inputs 0.677 (not pursued); words and character
4-grams of 4 KiB, 2^18, cut, 0.680 (not offered: about 5,000 buckets to sort per 2k-token
prompt puts the 100 µs decision budget at risk); the task model's tokens (words and
character 4-grams of 1 KiB + 256 B), 2^18, cut, 0.679 (L2 3e-4). Not candidates: a blend
with the prompt-blind prior (with two models the router's score ``p(strong) - p(weak)``
blended with constants is an increasing affine map of the unblended one, so it ranks prompts
identically and its APGR is the same), a blend with the per-subject prior (the core does not
know an MMLU prompt's subject), and TF-IDF LR's tokenizer (a change to the core's featurizer).

So the candidate set, fixed and committed with this paragraph before any outer fold is
scored with it: the feature sets ``ngrams``, ``words``, ``words-tfidf`` and, new,
``words-tfidf-df2`` (``words-tfidf``'s words in 2^18 buckets, idf 0 for a bucket in fewer
than 2 of the fit's training prompts) and ``ngrams-tfidf`` (``ngrams``' tokens, 2^18
buckets, tf-idf with the same cut); L2 {1e-4 (new), 3e-4, 3e-3, 3e-2} x steps {25, 50,
100, 200}; the prompt-blind prior; 3 inner folds, 5 outer folds, seed 0. The rule is
unchanged: the candidate with the best mean inner validation APGR (ties: the one listed
first), refitted on the outer-training part and scored once on the outer fold; the outer
figure is run once per dataset (MMLU and GSM8K) and reported as it comes out. A file with
the cut is an ordinary format 2 file (its idf table holds the zeros), so the core needs no
change; the shipped router (``build_models``' fixed recipe) does not change.

The procedure never ships a router worse than the prior: the prior is a candidate,
so the inner folds only choose the linear model where it beat the prior; and if the
outer estimate still puts the chosen model below the prior, the prior ships and
the report says so. A prior is an ordinary ``ERLM`` router (zero text weights, bias
= logit of each model's mean score), so the core loads it like any other.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeroute.learn import frontier as FR
from edgeroute.learn import router as R
from edgeroute.learn import train as T
from edgeroute.learn.evaluate import two_model_curve
from edgeroute.learn.features import FeaturizerConfig
from edgeroute.learn.model import LinearModel

PRIOR = "prior"
LINEAR = "linear"

# What the linear model may read, each a featurizer the core loads from the model file.
# "ngrams" is the task model's (so the two fuse into one pass over the prompt); "words"
# drops the character 4-grams, which generalise across spellings but add noise where the
# signal is in the words, and reads further into a long prompt (4 KiB + 256 B) since words
# cost fewer buckets per byte. Fixed before any figure was measured with them (see
# `routellm_eval`'s module doc).
FEATURE_SETS: dict[str, FeaturizerConfig] = {
    "ngrams": FeaturizerConfig(),
    "words": FeaturizerConfig(head_bytes=4096, char_ngrams=()),
    # tf-idf weighted (see the module doc): 2^17 buckets, the idf table stored in the file
    "words-tfidf": FeaturizerConfig(head_bytes=4096, char_ngrams=(), log2_buckets=17),
    # since the second tf-idf round (module doc): 2^18 buckets and TF-IDF LR's vocabulary cut
    # (a bucket in fewer than 2 training prompts has idf 0); the same words, and the task
    # model's tokens (words and character 4-grams of the first 1 KiB and last 256 B)
    "words-tfidf-df2": FeaturizerConfig(head_bytes=4096, char_ngrams=(), log2_buckets=18),
    "ngrams-tfidf": FeaturizerConfig(log2_buckets=18),
}
# Feature sets whose model reads tf-idf values: `Features` holds their raw counts, and
# each fit turns them into tf-idf with the idf of its own training rows.
TFIDF_SETS = frozenset({"words-tfidf", "words-tfidf-df2", "ngrams-tfidf"})
# A tf-idf set's vocabulary cut: buckets in fewer training prompts get idf 0 (T.idf_of).
TFIDF_MIN_DF: dict[str, int] = {"words-tfidf-df2": 2, "ngrams-tfidf": 2}
Features = dict[str, T.SparseDocs]
# Below this many prompts a fit takes less than a worker process takes to start.
AUTO_JOBS_MIN_PROMPTS = 2000


def design(
    xs: Features, f: str, fit_rows: Sequence[int], apply_rows: Sequence[int]
) -> tuple[T.SparseDocs, T.SparseDocs, T.F64 | None]:
    """Feature set ``f`` of the rows a model is fitted on and of the rows it is applied to,
    and the idf (of ``fit_rows`` only) for a tf-idf set, else None."""
    if f not in TFIDF_SETS:
        return xs[f].subset(fit_rows), xs[f].subset(apply_rows), None
    counts = xs[f].subset(fit_rows)
    idf = T.idf_of(counts, TFIDF_MIN_DF.get(f, 0))
    return T.tfidf_docs(counts, idf), T.tfidf_docs(xs[f].subset(apply_rows), idf), idf


def model_features(xs: Features, c: Candidate, model: LinearModel, rows: Sequence[int]) -> T.SparseDocs:
    """What `model` (fitted for `c`) reads for `rows`: a tf-idf model its own stored idf;
    a prior reads no bucket."""
    if c.family != LINEAR:
        empty = np.zeros(0, dtype=np.int64)
        return T.SparseDocs(empty, empty, np.zeros(0), len(rows), 1 << model.featurizer.log2_buckets)
    if model.idf:
        return T.tfidf_docs(xs[c.features].subset(rows), np.asarray(model.idf))
    return xs[c.features].subset(rows)


def featurize_sets(prompts: Sequence[str], names: Sequence[str]) -> Features:
    """The prompts' features under each named feature set (raw counts for a tf-idf set)."""
    unknown = [n for n in names if n not in FEATURE_SETS]
    if unknown:
        raise ValueError(f"unknown feature set {unknown[0]!r} (known: {', '.join(FEATURE_SETS)})")
    return {n: (T.featurize_counts if n in TFIDF_SETS else T.featurize)(prompts, FEATURE_SETS[n]) for n in names}


@dataclass(frozen=True)
class Candidate:
    family: str  # PRIOR or LINEAR
    l2: float = 0.0
    iters: int = 0
    features: str = "ngrams"

    def label(self) -> str:
        if self.family == PRIOR:
            return PRIOR
        return f"linear {self.features} l2={self.l2:g} iters={self.iters}"


@dataclass
class SearchSpace:
    """What the inner folds choose among (every value is a ``router train`` flag)."""

    l2: Sequence[float] = (1e-4, 3e-4, 3e-3, 3e-2)
    iters: Sequence[int] = (25, 50, 100, 200)
    features: Sequence[str] = ("ngrams", "words", "words-tfidf", "words-tfidf-df2", "ngrams-tfidf")
    lr: float = 0.1
    inner_folds: int = 3
    outer_folds: int = 5
    jobs: int = 0  # worker processes for the inner fits; 0: every core, for files of AUTO_JOBS_MIN_PROMPTS or more
    seed: int = 0
    steps: int = 100  # lambda grid of the validation frontier

    def candidates(self) -> list[Candidate]:
        return [Candidate(PRIOR)] + [
            Candidate(LINEAR, l2, it, f) for f in self.features for l2 in self.l2 for it in sorted(self.iters)
        ]


@dataclass
class Report:
    """What training found; printed by the CLI and kept in the router file's ``meta``."""

    criterion: str
    chosen: Candidate
    validation: dict[str, float]  # candidate label -> mean inner-fold criterion
    outer_router: list[float] = field(default_factory=list)
    outer_prior: list[float] = field(default_factory=list)
    fell_back: bool = False

    def meta(self) -> dict[str, object]:
        return {
            "criterion": self.criterion,
            "chosen": self.chosen.label(),
            "validation": {k: round(v, 5) for k, v in self.validation.items()},
            "outer_router": [round(v, 5) for v in self.outer_router],
            "outer_prior": [round(v, 5) for v in self.outer_prior],
            "fell_back_to_prior": self.fell_back,
        }


def prior_means(data: R.Outcomes) -> T.F64:
    """Each model's mean observed score (NaN cells skipped), kept inside [0.001, 0.999]."""
    obs = ~np.isnan(data.scores)
    s = np.nan_to_num(data.scores).sum(axis=0) / np.maximum(obs.sum(axis=0), 1)
    out: T.F64 = np.clip(s, 1e-3, 1 - 1e-3)
    return out


def prior_model(data: R.Outcomes, cfg: FeaturizerConfig, task_outputs: Sequence[str] = ()) -> LinearModel:
    """The prompt-blind prior as a router file (zero text weights)."""
    k = len(data.models)
    p = prior_means(data)
    d = 2 + len(task_outputs)
    return T.quantize(
        np.zeros((1 << cfg.log2_buckets, k)),
        np.zeros((d, k)),
        np.log(p / (1 - p)),
        cfg=cfg,
        outputs=data.models,
        activation="sigmoid",
        dense=["length", "task"] if task_outputs else ["length"],
        task_outputs=task_outputs,
        meta={"kind": "router"},
    )


def criterion_name(data: R.Outcomes) -> str:
    full = data.scores[~np.isnan(data.scores).any(axis=1)]
    if len(full) < 2:
        return "brier"  # logged traffic: one model per prompt, no frontier to measure
    ref = FR.Reference.of(data.models, full, np.asarray(data.costs))
    return "quality" if ref.apgr_undefined() else "apgr"


def score(pred: T.F64, actual: T.F64, costs: T.F64, criterion: str, steps: int) -> float:
    """Validation criterion over the prompts observed for every model; ``brier`` (minus the
    mean squared error of the predicted scores, over every observed cell) where no prompt is."""
    if criterion == "brier":
        seen = ~np.isnan(actual)
        return -float(np.mean((pred[seen] - actual[seen]) ** 2)) if seen.any() else float("nan")
    full = ~np.isnan(actual).any(axis=1)
    pred, actual = pred[full], actual[full]
    if len(actual) == 0:
        return float("nan")
    ref = FR.Reference.of([str(i) for i in range(actual.shape[1])], actual, costs)
    if criterion == "apgr" and not ref.apgr_undefined() and actual.shape[1] == 2:
        # two models: the exact threshold curve of score[best] - score[cheapest]
        hi, lo = ref.best, ref.cheapest
        return two_model_curve(
            (pred[:, hi] - pred[:, lo]).tolist(), actual[:, hi].tolist(), actual[:, lo].tolist()
        ).apgr()
    if criterion == "apgr" and not ref.apgr_undefined():
        v = FR.router_frontier(pred, actual, costs, steps).apgr(ref)
        return float("nan") if v is None else v
    pick = np.argmax(pred, axis=1)
    return float(actual[np.arange(len(actual)), pick].mean())


def _sigmoid(z: T.F64) -> T.F64:
    out: T.F64 = 1.0 / (1.0 + np.exp(-z))
    return out


@dataclass(frozen=True)
class _Inputs:
    """What every inner fit reads; sent once to each worker process."""

    data: R.Outcomes
    xs: Features
    dense: T.F64
    sw: T.F64 | None
    space: SearchSpace
    criterion: str


# One inner fit: (training rows, validation rows, feature set, L2).
_Unit = tuple[list[int], list[int], str, float]


def _prior_score(inp: _Inputs, train: list[int], val: list[int]) -> float:
    prior = prior_means(inp.data.subset(train))
    actual = inp.data.scores[val]
    return score(np.tile(prior, (len(val), 1)), actual, np.asarray(inp.data.costs), inp.criterion, inp.space.steps)


def _linear_scores(inp: _Inputs, train: list[int], val: list[int], f: str, l2: float) -> dict[Candidate, float]:
    """One Adam run on ``train``, scored on ``val`` at each of the search space's iteration counts."""
    costs = np.asarray(inp.data.costs)
    actual = inp.data.scores[val]
    dv = inp.dense[val]
    ys = inp.data.scores[train]
    marks = set(inp.space.iters)
    xtr, xv, _idf = design(inp.xs, f, train, val)
    out: dict[Candidate, float] = {}

    def at(t: int, w: T.F64, wd: T.F64, b: T.F64) -> None:
        if t in marks:
            pred = _sigmoid(xv.matmul(w) + dv @ wd + b)
            out[Candidate(LINEAR, l2, t, f)] = score(pred, actual, costs, inp.criterion, inp.space.steps)

    T.fit(
        xtr,
        inp.dense[train],
        np.nan_to_num(ys),
        activation="sigmoid",
        mask=(~np.isnan(ys)).astype(np.float64),
        sample_weight=None if inp.sw is None else inp.sw[train] / inp.sw[train].mean(),
        opts=T.FitOptions(l2=l2, iters=max(inp.space.iters), lr=inp.space.lr, dense_l2=l2),
        checkpoint=at,
    )
    return out


# A worker process's copy of the inputs (set by its initializer).
_WORKER_INPUTS: _Inputs | None = None


def _worker_init(inp: _Inputs) -> None:
    global _WORKER_INPUTS
    _WORKER_INPUTS = inp


def _worker_run(unit: _Unit) -> dict[Candidate, float]:
    assert _WORKER_INPUTS is not None
    return _linear_scores(_WORKER_INPUTS, *unit)


def _jobs(space: SearchSpace, n_prompts: int, n_units: int) -> int:
    """Worker processes for the inner fits: ``space.jobs``, or (0) every core for a file large
    enough that a fit outlasts a worker's start (~1 s), else none."""
    if space.jobs > 0:
        return min(space.jobs, n_units)
    if n_prompts < AUTO_JOBS_MIN_PROMPTS:
        return 1
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, n_units)


def _run_units(inp: _Inputs, units: list[_Unit], jobs: int) -> list[dict[Candidate, float]]:
    """Each unit's scores, in order: in this process, or over ``jobs`` spawned workers. Every
    fit is deterministic, so the result does not depend on ``jobs``."""
    if jobs <= 1:
        return [_linear_scores(inp, *u) for u in units]
    # spawn, not fork: a fork of a process with threads (a server, a test runner) can inherit a held lock
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(jobs, initializer=_worker_init, initargs=(inp,)) as pool:
        return pool.map(_worker_run, units, chunksize=1)


def _folds(idx: Sequence[int], k: int, seed: int) -> list[list[int]]:
    return [sorted(idx[i] for i in f) for f in R.kfold(len(idx), k, seed)]


def inner_folds(rows: Sequence[int], space: SearchSpace) -> list[list[int]]:
    """The validation folds `select` splits `rows` into (other predictors are scored on the same)."""
    return _folds(sorted(rows), space.inner_folds, space.seed + 1)


def select(
    data: R.Outcomes,
    xs: Features,
    dense: T.F64,
    rows: Sequence[int],
    space: SearchSpace,
    criterion: str,
    sw: T.F64 | None = None,
) -> tuple[Candidate, dict[Candidate, float]]:
    """Inner cross-validation over ``rows``: the candidate with the best mean criterion (ties: simpler).
    The fits (one per fold, feature set and L2) run in parallel when the file is large (``space.jobs``)."""
    inp = _Inputs(data, xs, dense, sw, space, criterion)
    totals: dict[Candidate, list[float]] = {}
    folds = inner_folds(rows, space)
    splits = [(sorted(i for j, f in enumerate(folds) if j != k for i in f), val) for k, val in enumerate(folds)]
    units: list[_Unit] = [(tr, val, f, l2) for tr, val in splits for f in space.features for l2 in space.l2]
    for scores in _run_units(inp, units, _jobs(space, len(rows), len(units))):
        for c, v in scores.items():
            totals.setdefault(c, []).append(v)
    totals[Candidate(PRIOR)] = [_prior_score(inp, tr, val) for tr, val in splits]
    means = {c: float(np.nanmean(v)) if not np.isnan(v).all() else float("-inf") for c, v in totals.items()}
    order = space.candidates()
    best = max(order, key=lambda c: (means.get(c, float("-inf")), -order.index(c)))
    return best, means


def fit_candidate(
    data: R.Outcomes,
    c: Candidate,
    xs: Features,
    dense: T.F64,
    rows: Sequence[int],
    space: SearchSpace,
    task_model: LinearModel | None,
    sw: T.F64 | None = None,
) -> LinearModel:
    sub = data.subset(list(rows))
    task_outputs = task_model.outputs if task_model is not None else ()
    if c.family == PRIOR:
        # the task model's featurizer, so that the core fuses the two (the prior reads no bucket)
        cfg = task_model.featurizer if task_model is not None else FEATURE_SETS["ngrams"]
        return prior_model(sub, cfg, task_outputs)
    w = None if sw is None else sw[list(rows)] / sw[list(rows)].mean()
    x, _, idf = design(xs, c.features, list(rows), [])
    return R.train_router(
        sub,
        task_model=task_model,
        cfg=FEATURE_SETS[c.features],
        opts=T.FitOptions(l2=c.l2, iters=c.iters, lr=space.lr, dense_l2=c.l2),
        x=x,
        dense=dense[list(rows)],
        sample_weight=w,
        idf=idf,
    )


def nested(
    data: R.Outcomes,
    xs: Features,
    dense: T.F64,
    space: SearchSpace,
    task_model: LinearModel | None = None,
    sw: T.F64 | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[LinearModel, Report]:
    """Outer estimate (when ``outer_folds`` > 1), then selection and fit on all rows."""
    criterion = criterion_name(data)
    costs = np.asarray(data.costs)
    n = len(data.prompts)
    say: Callable[[str], None] = print if log is None else log
    outer_r: list[float] = []
    outer_p: list[float] = []
    if space.outer_folds > 1:
        folds = _folds(list(range(n)), space.outer_folds, space.seed)
        for k, test in enumerate(folds):
            train = sorted(i for j, f in enumerate(folds) if j != k for i in f)
            chosen, _ = select(data, xs, dense, train, space, criterion, sw)
            model = fit_candidate(data, chosen, xs, dense, train, space, task_model, sw)
            pred = T.predict_matrix(model, model_features(xs, chosen, model, test), dense[test])
            prior = np.tile(prior_means(data.subset(train)), (len(test), 1))
            outer_r.append(score(pred, data.scores[test], costs, criterion, space.steps))
            outer_p.append(score(prior, data.scores[test], costs, criterion, space.steps))
            say(f"outer fold {k + 1}/{space.outer_folds}: chose {chosen.label()}; "
                f"{criterion} router {outer_r[-1]:.4f} prior {outer_p[-1]:.4f}")  # fmt: skip
    chosen, means = select(data, xs, dense, range(n), space, criterion, sw)
    report = Report(criterion, chosen, {c.label(): v for c, v in means.items()}, outer_r, outer_p)
    if outer_r and chosen.family != PRIOR and float(np.mean(outer_r)) < float(np.mean(outer_p)):
        report.chosen = Candidate(PRIOR)
        report.fell_back = True
    model = fit_candidate(data, report.chosen, xs, dense, range(n), space, task_model, sw)
    return model, report
