"""The feedback learner's state file with `serve --workers N` (no shared_state).

Each worker keeps its own learner and saves it to the configured `state_path` every few
seconds, so the workers write one file at the same moments. The file was written through a
temporary file of one fixed name: one worker renamed another's half-written file away, and
the other's rename failed (FileNotFoundError), which ended its refresh loop: from then on
that worker's feedback no longer moved routing, nor was saved.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from edgeroute.learning import FeedbackLearner


def test_workers_saving_one_state_file_at_once_never_fail_nor_corrupt_it(tmp_path: Path) -> None:
    path = tmp_path / "learning.json"
    failures: list[BaseException] = []

    def worker(n: int) -> None:  # what each worker process holds: its own learner on the shared path
        learner = FeedbackLearner(path)
        learner.served(f"req-{n}", "strong", "code", 0.01)
        assert learner.feedback(f"req-{n}", 1.0) is not None
        for _ in range(300):
            try:
                learner.save()
            except BaseException as e:
                failures.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    saved = json.loads(path.read_text())
    assert [(r["task"], r["route"]) for r in saved["posteriors"]] == [("code", "strong")]
    assert not [p.name for p in tmp_path.iterdir() if p != path], "no temporary file left behind"
    # A restarted worker reads it back.
    assert FeedbackLearner(path).posteriors[("code", "strong")].alpha > 1
