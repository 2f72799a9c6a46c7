"""Training the task-type classifier (the recipe behind ``edgeroute/models/task.erlm``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeroute.learn import train as T
from edgeroute.learn.data import REALISTIC_SOURCES, Example
from edgeroute.learn.features import FeaturizerConfig
from edgeroute.learn.model import TASK_CLASSES, LinearModel
from edgeroute.learn.router import kfold

TASK_FEATURIZER = FeaturizerConfig()  # the router's too: the core hashes each prompt once
TASK_FIT = T.FitOptions(l2=1e-5, iters=60, lr=0.1)
# Real-user-style prompts (Arena-Hard, our chat-style seeds) weigh this much more than
# templated benchmark prompts of the same class. Chosen by ``python -m
# edgeroute.learn.task_eval --select`` (grouped CV over the Arena-Hard v0.1 hand labels
# + the chat-style seeds, no Arena-Hard v2.0 prompt anywhere). With the 2,839 seeds:
# macro-F1 0.907 / 0.907 / 0.908 for 1x / 2x / 3x, v0.1 part 0.669 / 0.666 / 0.666, all
# within noise; 2x was the choice with the first 989 seeds (0.926 vs 0.929, 1x vs 2x).
REALISTIC_WEIGHT = 2.0


CALIBRATION_FOLDS = 3
# Sources whose examples are spread over the calibration folds one by one. Any other source
# names one benchmark task (a development set's prompts) and is held out whole: its prompts
# share a template, so a fold that trained on some of them would be fitted on in-template
# predictions, which are more confident than the off-template ones traffic brings.
SPREAD_SOURCES = frozenset(
    {"seed", "seed_chat", "mmlu", "gsm8k", "vllm_sr", "humaneval", "mt_bench", "arena_hard_v2.0", "arena_hard_v0.1"}
)
TEMPERATURES = tuple(round(0.25 * k, 2) for k in range(2, 25))  # 0.5 .. 6.0


def calibration_folds(sources: Sequence[str], k: int = CALIBRATION_FOLDS, seed: int = 0) -> list[list[int]]:
    """``k`` disjoint folds of ``range(len(sources))``: examples of a spread source one by one
    (exactly :func:`~edgeroute.learn.router.kfold` when every source is), each other source whole."""
    n = len(sources)
    spread = [i for i, s in enumerate(sources) if s in SPREAD_SOURCES]
    if len(spread) == n:
        return kfold(n, k, seed=seed)
    folds = [[spread[j] for j in f] for f in kfold(len(spread), k, seed=seed)]
    groups = sorted({s for s in sources if s not in SPREAD_SOURCES})
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[int(g)]: r % k for r, g in enumerate(order)}
    for i, s in enumerate(sources):
        if s not in SPREAD_SOURCES:
            folds[fold_of[s]].append(i)
    return [sorted(f) for f in folds]


def fit_temperature(logits: T.F64, y: T.F64, sw: T.F64) -> float:
    """The softmax temperature minimising the weighted log-loss of out-of-fold logits.

    Dividing every logit by one temperature keeps each arg-max and makes the
    probabilities honest: an over-confident model (as a linear model with little
    regularisation on separable training data is) gets T > 1.
    """
    best, best_loss = 1.0, float("inf")
    for t in TEMPERATURES:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-(sw * (y * logp).sum(axis=1)).sum() / sw.sum())
        if loss < best_loss:
            best, best_loss = t, loss
    return best


def training_rows(
    originals: Sequence[Example],
    realistic_weight: float = REALISTIC_WEIGHT,
    augment: bool = True,
    weights: Sequence[float] | None = None,
) -> tuple[list[Example], list[int], T.F64, T.F64]:
    """The rows :func:`train_task_model` fits: the originals, then (with ``augment``) their
    wrapped copies; each row's original's index, the one-hot labels over TASK_CLASSES and the
    sample weights (1/class count, x ``realistic_weight`` for real-user-style rows, x the
    original's ``weights``; mean 1)."""
    n = len(originals)
    rows = list(originals)
    parent = list(range(n))  # each wrapped copy follows, tied to its original's index
    if augment:
        from edgeroute.learn.augment import wrapped

        for i, e in enumerate(originals):
            copies = wrapped([e])
            rows += copies
            parent += [i] * len(copies)
    y = np.zeros((len(rows), len(TASK_CLASSES)))
    for i, e in enumerate(rows):
        y[i, TASK_CLASSES.index(e.label)] = 1.0
    counts = y.sum(axis=0)
    sw = 1.0 / np.maximum(counts[y.argmax(axis=1)], 1.0)
    sw *= np.asarray([realistic_weight if e.source in REALISTIC_SOURCES else 1.0 for e in rows])
    if weights is not None:
        if len(weights) != n:
            raise ValueError("one weight per example")
        sw *= np.asarray([float(weights[p]) for p in parent])
    sw /= sw.mean()
    return rows, parent, y, sw


def train_task_model(
    examples: Sequence[Example],
    cfg: FeaturizerConfig = TASK_FEATURIZER,
    opts: T.FitOptions = TASK_FIT,
    realistic_weight: float = REALISTIC_WEIGHT,
    calibrate: bool = True,
    augment: bool = True,
    weights: Sequence[float] | None = None,
) -> LinearModel:
    """Softmax over TASK_CLASSES; classes weighted by 1/count, so each class weighs the same.

    The benchmark sources (MMLU, GSM8K, HumanEval) are large and templated; the real-user
    classes they lack (creative writing, "other") would otherwise be drowned. Within a
    class, real-user-style examples (:data:`~edgeroute.learn.data.REALISTIC_SOURCES`)
    weigh :data:`REALISTIC_WEIGHT` times a templated one.

    With ``augment``, copies inside instruction wrappers are added
    (:mod:`edgeroute.learn.augment`), so a harness's framing does not move a prediction.

    With ``calibrate``, a temperature fitted on out-of-fold predictions (fixed
    folds, :data:`CALIBRATION_FOLDS`) is folded into the weights, so the shipped
    probabilities mean what they say (``tasks:`` rules may require a minimum).

    ``weights``, one per example, multiply its weight (and its wrapped copies').
    """
    originals = list(examples)
    n = len(originals)
    rows, parent, y, sw = training_rows(originals, realistic_weight, augment, weights)
    texts = [e.text for e in rows]
    x = T.featurize(texts, cfg)
    dense = T.length_matrix(texts)
    temperature = 1.0
    if calibrate and n >= 10 * CALIBRATION_FOLDS:
        # Folds over the originals; a wrapped copy trains only where its original does,
        # and the temperature is fitted on the originals' out-of-fold logits.
        oof = np.zeros((n, len(TASK_CLASSES)))
        for fold in calibration_folds([e.source for e in originals]):
            held = set(fold)
            tr = [j for j, p in enumerate(parent) if p not in held]
            fw, fwd, fb = T.fit(x.subset(tr), dense[tr], y[tr], activation="softmax", sample_weight=sw[tr], opts=opts)
            oof[fold] = x.subset(fold).matmul(fw) + dense[fold] @ fwd + fb
        temperature = fit_temperature(oof, y[:n], sw[:n])
    w, wd, b = T.fit(x, dense, y, activation="softmax", sample_weight=sw, opts=opts)
    return T.quantize(
        w / temperature,
        wd / temperature,
        b / temperature,
        cfg=cfg,
        outputs=TASK_CLASSES,
        activation="softmax",
        dense=["length"],
        meta={"kind": "task", "n_train": n, "n_wrapped": len(rows) - n, "temperature": temperature},
    )


def predict_labels(model: LinearModel, texts: Sequence[str], among: Sequence[str] | None = None) -> list[str]:
    """Most probable class of each text, over all outputs or only those in ``among``."""
    x = T.featurize(texts, model.featurizer)
    p = T.predict_matrix(model, x, T.length_matrix(texts))
    keep = [model.outputs.index(c) for c in among] if among else list(range(len(model.outputs)))
    return [model.outputs[keep[int(i)]] for i in p[:, keep].argmax(axis=1)]
