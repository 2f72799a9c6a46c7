"""``python -m edgeroute.learn.task_eval``: macro-F1 of the task classifier on Arena-Hard v0.1.

Trains on the assembled task data (Arena-Hard v0.1 excluded: it is the test set)
and scores code / math / creative_writing against our per-prompt labels
(``labels/arena_hard_v0.1_task_labels.json``; every other prompt is "other", so
predicting one of the three for it is a false positive).
"""

from __future__ import annotations

import sys
from collections import Counter

from edgeroute.learn import data
from edgeroute.learn.evaluate import f1_scores

FOCUS = ("code", "math", "creative_writing")


def run() -> dict[str, float]:
    from edgeroute.learn.tasks import predict_labels, train_task_model

    train = data.task_training_examples()
    test = data.arena_hard_test()
    test_texts = {e.text for e in test}
    train = [e for e in train if e.text not in test_texts]
    model = train_task_model(train)
    pred = predict_labels(model, [e.text for e in test])
    f1 = f1_scores([e.label for e in test], pred, FOCUS)
    f1["macro"] = sum(f1[k] for k in FOCUS) / len(FOCUS)
    print(f"train n={len(train)}  test n={len(test)} {dict(Counter(e.label for e in test))}")
    print("predicted:", dict(Counter(pred).most_common()))
    for k in (*FOCUS, "macro"):
        print(f"F1 {k:18s} {f1[k]:.3f}")
    return f1


def main() -> int:
    if not data.have_data():
        print(f"no data at {data.data_root()}", file=sys.stderr)
        return 2
    run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
