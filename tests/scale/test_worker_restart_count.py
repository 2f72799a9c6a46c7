"""The supervisor's restart count, as the worker that takes a scrape reads it.

`edgeroute_worker_restarts_total` is read from a file the supervisor rewrites at each restart.
Rewritten in place (truncated, then written), a scrape that read it between the two found it
empty and reported 0 restarts: a counter that fell back to zero, which Prometheus takes for a
reset. Replaced whole, a reader sees the old count or the new one.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

from edgeroute.workers.worker import Worker, read_restarts, write_restarts

WRITES = 3000


def test_a_scrape_never_sees_the_restart_count_torn(tmp_path: Path) -> None:
    write_restarts(tmp_path, 1)
    # The supervisor's own write, from another process, as fast as it can go.
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                from pathlib import Path
                from edgeroute.workers.worker import write_restarts
                for n in range(2, {WRITES + 2}):
                    write_restarts(Path({str(tmp_path)!r}), n)
            """),
        ]
    )
    worker = Worker(id=0, count=2, dir=tmp_path)
    seen: list[int] = []
    try:
        while writer.poll() is None:
            seen.append(worker.restarts())
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert len(seen) > WRITES // 10, "the reader barely ran: the test proved nothing"
    went_back = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
    assert not went_back, f"{len(went_back)} reads went back, e.g. {went_back[:3]}"
    assert read_restarts(tmp_path) == WRITES + 1
    # Nothing is left behind but the count itself (the temporary files are renamed over it).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restarts"]
