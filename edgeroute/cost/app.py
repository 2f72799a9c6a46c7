"""Wiring cost control into the aiohttp app: recorder, admission, `/admin/spend`, cleanup.

`server.create_app` calls :func:`middleware` and :func:`install`; a recorder or admission
passed by the caller wins over the config (tests, embedding).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from edgeroute.accounting import MemoryRecorder, Recorder
from edgeroute.admission import ADMISSION, Admission, AdmitAll
from edgeroute.config import Config
from edgeroute.config.checks import shared_state_notes
from edgeroute.cost import ledger_lock
from edgeroute.cost.budget_report import admin_budgets
from edgeroute.cost.control import CostControl, on_response_prepare
from edgeroute.cost.keys import MANAGED_KEYS
from edgeroute.cost.ledger import ledger_from_config
from edgeroute.cost.reports import LEDGER, admin_spend
from edgeroute.requestlog import api as requestlog_api
from edgeroute.state import RECORDER

log = logging.getLogger("edgeroute.cost")


def base_dir(source: str) -> Path | None:
    p = Path(source)
    return p.parent if p.is_file() else None


def install(
    app: web.Application, config: Config, source: str, recorder: Recorder | None, admission: Admission | None
) -> None:
    ledger = ledger_from_config(config, base_dir(source)) if recorder is None else None
    app[RECORDER] = recorder or ledger or MemoryRecorder()
    if ledger is not None:
        app[LEDGER] = ledger.backend
    control = CostControl(config) if admission is None and CostControl.wanted(config) else None
    if control is not None:
        control.ledger = ledger
        for note in shared_state_notes(config):  # as `edgeroute check` prints it
            log.warning(note)
    app[ADMISSION] = admission or control or AdmitAll()
    app.router.add_get("/admin/spend", admin_spend)
    app.router.add_get("/admin/budgets", admin_budgets)
    requestlog_api.install(app, ledger.backend if ledger is not None and ledger.request_log is not None else None)
    if control is not None:
        app.on_response_prepare.append(on_response_prepare)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        if control is not None and ledger is not None:
            # Before serving: budgets (managed keys' too) and rate-limit windows as the ledger
            # left them. Managed keys are loaded by now (governance's install).
            await asyncio.to_thread(control.restore_at_start, ledger.backend, app.get(MANAGED_KEYS))
            loop = asyncio.get_running_loop()
            forget = ledger_lock.on_taken_back(
                lambda: asyncio.run_coroutine_threadsafe(control.read_back_again(), loop).result(60)
            )
            await asyncio.to_thread(control.told_before, ledger.backend, control.budgets, time.time())
            await control.seed_shared()
            await control.start_liveness()
        elif control is not None:
            control.keys = app.get(MANAGED_KEYS)
        if control is not None:
            control.follow_shared()
        yield
        # After the drain: settle what is pending, then write every record.
        if control is not None and ledger is not None:
            forget()
        if control is not None:
            await control.close()
        if ledger is not None:
            await asyncio.to_thread(ledger.close)
            log.info("ledger closed: %d records written", ledger.written)

    app.cleanup_ctx.append(lifecycle)
