"""``python -m edgeroute.learn.build_models``: retrain the shipped models and the parity fixture.

Writes ``edgeroute/models/task.erlm`` (task classifier trained on *all* task
data, including the Arena-Hard v2.0 and v0.1 prompts that
:mod:`edgeroute.learn.task_eval` holds out for its figures and the four scored fresh
sets, fetched with pip into the cache (:func:`edgeroute.learn.task_devset.shipped_training`):
the shipped model has seen them all, so measure it on none; the fifth fresh set is the
one it has not), ``edgeroute/models/router-gpt4-mixtral.erlm``
(router trained on all decontaminated GSM8K + MMLU outcomes, same recipe as
the cross-validated figure) and
``rust/edgeroute-core/tests/fixtures/classify_parity.json`` (texts -> buckets,
length features, probabilities from the Python reference implementation),
which the Rust test ``tests/classify_parity.rs`` replays, and ``edgeroute/models/manifest.json``
(the files' sha256 and the inputs they were trained on). Deterministic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgeroute.learn import data, manifest
from edgeroute.learn.features import bucket_ids, length_features
from edgeroute.learn.model import LinearModel

MODELS = Path(__file__).resolve().parents[1] / "models"
TASK_MODEL = MODELS / "task.erlm"
ROUTER_MODEL = MODELS / "router-gpt4-mixtral.erlm"
FIXTURE = data.REPO / "rust" / "edgeroute-core" / "tests" / "fixtures" / "classify_parity.json"

PARITY_TEXTS = [
    "",
    "hi",
    "Write a Python function that reverses a linked list.",
    "What is 17 * 23 + 4? Show your steps.",
    "Write a sonnet about the sea, in the style of Shakespeare.",
    "Translate to French: Où est la gare? ¿Dónde está la estación? 駅はどこですか",
    "Summarize: The quick brown fox jumps over the lazy dog. It was a sunny day.",
    'fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!("{:?}", x);\n}\n',
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins "
    "with four. She sells the remainder at $2 per egg. How much does she make?",
    "Which of the following is a prime number?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:",
    "MiXeD CaSe ÄÖÜ émigré naïve \t\r\n tabs_and_underscores __init__ x86-64 a+b=c",
    # CJK, kana and Hangul split per character; the full-width comma (U+FF0C) does not
    "写一个Python程序，计算斐波那契数列的第n项。日本語のテキストです。한국어 문장입니다 x中y",  # noqa: RUF001
    # > head + tail bytes, with a multi-byte character straddling both cut points
    "a" + "é" * 1600 + " middle part that is dropped " * 40 + "ü" * 700 + " the end?",
    # the same with 3-byte CJK characters cut at both ends of the window
    "ab" + "中文" * 300 + " dropped " * 40 + "数组" * 200 + "?",
]


def build_task_model() -> LinearModel:
    from edgeroute.learn.task_devset import shipped_training
    from edgeroute.learn.tasks import train_task_model

    examples, weights = shipped_training()
    return train_task_model(examples, weights=weights)


def build_router_model() -> LinearModel:
    from edgeroute.learn import router as R
    from edgeroute.learn.routellm_eval import FIT, routellm_outcomes

    out, which = routellm_outcomes()
    return R.train_router(out, opts=FIT, sample_weight=R.source_weights(which))


def write_fixture(task: LinearModel, router: LinearModel) -> None:
    cases = []
    for text in PARITY_TEXTS:
        probs = task.predict_proba(text)
        cases.append(
            {
                "text": text,
                "buckets": bucket_ids(text, task.featurizer),
                "length": length_features(text),
                "task_probabilities": probs,
                "router_scores": router.predict_proba(text, probs),
            }
        )
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps({"cases": cases}, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> int:
    if not data.have_data():
        print(f"no data at {data.data_root()}", file=sys.stderr)
        return 2
    MODELS.mkdir(exist_ok=True)
    from edgeroute.learn.fresh_eval import Unavailable

    try:
        task = build_task_model()
    except (Unavailable, OSError) as exc:
        print(f"the task model trains on the scored fresh sets, which are unavailable: {exc}", file=sys.stderr)
        return 2
    task.save(TASK_MODEL)
    router = build_router_model()
    router.save(ROUTER_MODEL)
    write_fixture(task, router)
    manifest.write()
    for p in (TASK_MODEL, ROUTER_MODEL, FIXTURE, manifest.MANIFEST):
        print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
