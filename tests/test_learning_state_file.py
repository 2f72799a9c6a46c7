"""The feedback learner's state file when it cannot be read at start (truncated by a full disk,
edited by hand): the learner starts afresh, and the file was overwritten by its first save,
so what had been learned was gone for good. It is set aside now, beside the new one. A real
`edgeroute serve`, stopped with SIGTERM (which saves the learner)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from tests.conftest import simple_config, wait_ready
from tests.serve_support import killed, start_serve

TRUNCATED = '{"posteriors": [{"task": "code", "route": "strong", "alpha": 41.0, "be'


async def test_an_unreadable_learning_state_is_set_aside_not_overwritten(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    state = tmp_path / "learning.json"
    state.write_text(TRUNCATED)
    cfg = simple_config({"a": up}, learning={"feedback": {"state_path": "learning.json"}}, ledger={"backend": "memory"})
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serving = await start_serve(tmp_path / "edge.yaml", cfg, stdout=out, stderr=asyncio.subprocess.STDOUT)
    proc = serving.proc
    try:
        await wait_ready(serving.url, proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await killed(proc)
    _check_files(tmp_path, state, log)


def _check_files(tmp: Path, state: Path, log: Path) -> None:
    json.loads(state.read_text())  # the learner's new state
    aside = [p for p in tmp.iterdir() if p.name.startswith("learning.json.unreadable-")]
    assert len(aside) == 1 and aside[0].read_text() == TRUNCATED, [p.name for p in tmp.iterdir()]
    assert aside[0].name in log.read_text(), log.read_text()
