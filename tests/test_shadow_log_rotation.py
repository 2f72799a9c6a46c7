"""The shadow log rotated by several processes writing it at once (`serve --workers N`).

Found by a red team (session 34, red8 SH1): each worker rotated the one file on its own, so two
workers past the bound together both rotated it: the second found no live file
(FileNotFoundError out of `ShadowLog.write`, the pair lost and the mirror task failed) or shifted
a just-rotated file again (a `.1` of a few hundred bytes: older pairs dropped sooner than
`shadow_log_keep` says). Real processes, one real file."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path
from typing import Any

from edgeroute.shadow_log import ShadowLog

MAX_BYTES = 4096
KEEP = 5
WRITES = 1500


def _writer(path: str, n: int, errors: Any) -> None:
    log = ShadowLog(Path(path), max_bytes=MAX_BYTES, files=KEEP)
    failed = []
    for i in range(n):
        try:
            log.write({"pid": os.getpid(), "i": i, "pad": "x" * 200})
        except Exception:  # what a mirror task would die of
            failed.append(traceback.format_exc(limit=2))
    errors.put(failed)


def test_workers_writing_one_shadow_log_rotate_it_once_each_time(tmp_path: Path) -> None:
    path = tmp_path / "shadow.jsonl"
    ctx = multiprocessing.get_context("spawn")  # not a fork of a process with threads (the other tests')
    errors = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(path), WRITES, errors)) for _ in range(4)]
    for p in procs:
        p.start()
    failed = [e for _ in procs for e in errors.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert failed == [], f"{len(failed)} writes failed; the first:\n{failed[0]}"
    rotated = [path.with_name(f"{path.name}.{n}") for n in range(1, KEEP + 1)]
    assert all(f.exists() for f in rotated)  # 1.2 MB written: every rotated slot is filled
    assert not path.with_name(f"{path.name}.{KEEP + 1}").exists()
    # Each rotated file was past the bound when rotated, none shifted again early.
    sizes = {f.name: f.stat().st_size for f in rotated}
    assert all(size >= MAX_BYTES for size in sizes.values()), sizes
    # The live file is missing when the last write rotated it (a new one is made by the next).
    live = [path] if path.exists() else []
    for f in [*live, *rotated]:  # whole JSON lines, no pair torn across a rotation
        assert all(line.startswith(b"{") and line.endswith(b"}") for line in f.read_bytes().splitlines())
