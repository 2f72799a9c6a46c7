"""Baselines a learned router is printed beside: group priors and TF-IDF logistic regression.

* **group prior**: each model's mean score within the prompt's group (an MMLU subject,
  a dataset) on the training prompts, the overall mean for groups it has not seen;
  with a single group it is the prompt-blind prior.
* **TF-IDF logistic regression**: word unigrams and bigrams (document frequency >= 2
  in the training prompts), sublinear term frequency, smoothed IDF, rows L2-normalised;
  one logistic regression per model at a fixed, conventional strength (the equivalent
  of C = 1 per training example). Nothing is tuned on the test prompts.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from edgeroute.learn import train as T

_WORD = re.compile(r"\w+", re.UNICODE)


def group_prior(train_groups: Sequence[str], train_scores: T.F64, test_groups: Sequence[str]) -> T.F64:
    """Per-group mean scores [n_test, n_models] (NaN cells skipped)."""
    overall = np.nanmean(train_scores, axis=0)
    sums: dict[str, list[T.F64]] = {}
    for g, row in zip(train_groups, train_scores, strict=True):
        sums.setdefault(g, []).append(row)
    means = {g: np.nanmean(np.asarray(rows), axis=0) for g, rows in sums.items()}
    return np.asarray([means.get(g, overall) for g in test_groups])


def _terms(text: str) -> list[str]:
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


def tfidf(train: Sequence[str], test: Sequence[str], min_df: int = 2) -> tuple[T.SparseDocs, T.SparseDocs]:
    """TF-IDF rows of ``train`` and ``test`` over the training vocabulary."""
    train_terms = [Counter(_terms(t)) for t in train]
    df: Counter[str] = Counter()
    for c in train_terms:
        df.update(c.keys())
    vocab = {t: i for i, t in enumerate(sorted(t for t, n in df.items() if n >= min_df))}
    n = len(train)
    idf = {t: math.log((1 + n) / (1 + df[t])) + 1 for t in vocab}

    def rows(counts: Sequence[Counter[str]]) -> T.SparseDocs:
        r: list[int] = []
        c: list[int] = []
        v: list[float] = []
        for i, cnt in enumerate(counts):
            items = [(vocab[t], (1 + math.log(k)) * idf[t]) for t, k in cnt.items() if t in vocab]
            norm = math.sqrt(sum(w * w for _, w in items)) or 1.0
            for j, w in sorted(items):
                r.append(i)
                c.append(j)
                v.append(w / norm)
        return T.SparseDocs(
            np.asarray(r, dtype=np.int64),
            np.asarray(c, dtype=np.int64),
            np.asarray(v, dtype=np.float64),
            len(counts),
            max(len(vocab), 1),
        )

    return rows(train_terms), rows([Counter(_terms(t)) for t in test])


def tfidf_lr(train: Sequence[str], train_scores: T.F64, test: Sequence[str], iters: int = 200) -> T.F64:
    """Predicted score of each model on ``test`` [n_test, n_models]."""
    xtr, xte = tfidf(train, test)
    mask = (~np.isnan(train_scores)).astype(np.float64)
    no_dense = np.zeros((len(train), 0))
    opts = T.FitOptions(l2=1.0 / max(len(train), 1), iters=iters, lr=0.1, dense_l2=0.0)
    w, _wd, b = T.fit(xtr, no_dense, np.nan_to_num(train_scores), activation="sigmoid", mask=mask, opts=opts)
    out: T.F64 = 1.0 / (1.0 + np.exp(-(xte.matmul(w) + b)))
    return out


# The keyword baseline of the task classifier: three lines of the kind anyone would write
# first. Fixed once here, never tuned on a test set; printed beside every task figure.
_CODE = re.compile(
    r"\b(code|python|java(script)?|c\+\+|rust|sql|function|class|script|program|bug|compile|api|regex)\b"
)
_MATH = re.compile(r"\b(calculate|compute|solve|equation|integral|derivative|probability|prove|how many|how much)\b")
_CREATIVE = re.compile(r"\b(story|poem|poetry|lyrics|song|haiku|limerick|sonnet|fiction|screenplay|novel)\b")


def keyword_task(text: str) -> str:
    """code / math / creative_writing by keyword, else other."""
    t = text.lower()
    if _CODE.search(t):
        return "code"
    if _MATH.search(t):
        return "math"
    if _CREATIVE.search(t):
        return "creative_writing"
    return "other"
