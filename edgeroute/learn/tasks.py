"""Training the task-type classifier (the recipe behind ``edgeroute/models/task.erlm``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeroute.learn import train as T
from edgeroute.learn.data import Example
from edgeroute.learn.features import FeaturizerConfig
from edgeroute.learn.model import TASK_CLASSES, LinearModel

TASK_FEATURIZER = FeaturizerConfig()  # the router's too: the core hashes each prompt once
TASK_FIT = T.FitOptions(l2=1e-5, iters=60, lr=0.1)


def train_task_model(
    examples: Sequence[Example],
    cfg: FeaturizerConfig = TASK_FEATURIZER,
    opts: T.FitOptions = TASK_FIT,
) -> LinearModel:
    """Softmax over TASK_CLASSES; classes weighted by 1/count, so each class weighs the same.

    The benchmark sources (MMLU, GSM8K, HumanEval) are large and templated; the real-user
    classes they lack (creative writing, "other") would otherwise be drowned.
    """
    texts = [e.text for e in examples]
    y = np.zeros((len(examples), len(TASK_CLASSES)))
    for i, e in enumerate(examples):
        y[i, TASK_CLASSES.index(e.label)] = 1.0
    counts = y.sum(axis=0)
    sw = 1.0 / counts[y.argmax(axis=1)]
    sw /= sw.mean()
    x = T.featurize(texts, cfg)
    w, wd, b = T.fit(x, T.length_matrix(texts), y, activation="softmax", sample_weight=sw, opts=opts)
    return T.quantize(
        w,
        wd,
        b,
        cfg=cfg,
        outputs=TASK_CLASSES,
        activation="softmax",
        dense=["length"],
        meta={"kind": "task", "n_train": len(examples)},
    )


def predict_labels(model: LinearModel, texts: Sequence[str]) -> list[str]:
    x = T.featurize(texts, model.featurizer)
    p = T.predict_matrix(model, x, T.length_matrix(texts))
    return [model.outputs[int(i)] for i in p.argmax(axis=1)]
