"""A proxy that has served a known mix of traffic, for the console's browser tests.

Three fault-injecting upstreams (`bench.faults`) on loopback, the real proxy (real config
file, SQLite ledger, virtual keys with each role) on its own event loop in a thread, and
traffic sent by the official openai SDK: plain and streamed answers, requests that fail
over to a backup when the primary answers 503, requests routed by a rule to a cheaper
model, and a request for a model that does not exist.

`python -m tests.ui.harness` serves it until Ctrl-C (to look at the console by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import yaml

from edgeroute import config as config_mod
from edgeroute.bench.faults import FaultUpstream
from edgeroute.cost.ledger import Ledger
from edgeroute.http_server import ProxyServer
from edgeroute.requestlog.settings import RequestLog
from edgeroute.server import create_app
from edgeroute.state import RECORDER

TOKENS = {"admin": "tok-ui-admin", "viewer": "tok-ui-viewer", "operator": "tok-ui-operator", "service": "tok-ui-app"}
# Keys of one team: its viewer signs in to the console, its app sends `Traffic.team` requests.
TEAM = "ui-team"
TEAM_TOKENS = {"team-viewer": "tok-ui-team-viewer", "team-app": "tok-ui-team-app"}
HELLO = [{"role": "user", "content": "Say hello."}]


@dataclass
class Traffic:
    """What the harness sent, to check the console against."""

    ok: int = 0
    streamed: int = 0
    failed_over: list[str] = field(default_factory=list)  # request ids
    with_pii: str | None = None  # a request id whose prompt holds an e-mail address
    by_rule: int = 0
    refused: int = 0
    team: int = 0  # sent by the team's key (model `cheap`), counted in `ok` too


def config_data(urls: dict[str, str], ledger: Path, with_keys: bool, managed_keys: bool = False) -> dict[str, Any]:
    def dep(provider: str, price_in: float, price_out: float) -> dict[str, Any]:
        price = {"input_per_mtok": price_in, "output_per_mtok": price_out}
        return {"provider": provider, "model": "gpt-4o-mini", "price": price}

    cfg: dict[str, Any] = {
        "providers": {name: {"base_url": url, "api_key": f"key-{name}"} for name, url in urls.items()},
        "deployments": {
            "d-primary": dep("primary", 2.5, 10.0),
            "d-backup": dep("backup", 5.0, 15.0),
            "d-cheap": dep("cheap", 0.15, 0.6),
        },
        "models": {
            "m": {"deployments": ["d-primary"], "fallbacks": ["backup"]},
            "backup": {"deployments": ["d-backup"]},
            "cheap": {"deployments": ["d-cheap", "d-backup"], "strategy": "lowest_cost"},
        },
        "rules": [{"name": "invoices-to-cheap", "when": {"keywords": ["invoice"]}, "then": {"route": "cheap"}}],
        "ledger": {"backend": "sqlite", "path": str(ledger), "flush_interval": 0.2},
        "budgets": {
            "limits": [
                {"name": "monthly", "scope": "global", "limit_usd": 5.0, "period": "month"},
                {"name": "team-monthly", "scope": "team", "limit_usd": 2.0, "period": "month"},
            ]
        },
        "rate_limits": {"models": {"m": {"rpm": 600, "tpm": 200000}}},
    }
    if "log_content" in RequestLog.model_fields:
        cfg["request_log"] = {"log_content": "redacted"}
    if "alerts" in config_mod.Config.model_fields:
        # The two 503s among the primary's ten attempts: 20% errors, over the 5% threshold. The
        # window outlasts the module's tests, however slow the machine: the alert stays firing.
        rule = {"name": "primary-errors", "kind": "error_rate", "threshold": 0.05, "window_s": 3600,
                "min_requests": 5, "deployments": ["d-primary"], "severity": "critical"}  # fmt: skip
        cfg["alerts"] = {"interval_s": 1, "rules": [rule]}
    if with_keys:
        cfg["keys"] = {f"k-{role}": {"token": tok, "role": role} for role, tok in TOKENS.items()}
        cfg["keys"]["k-team-viewer"] = {"token": TEAM_TOKENS["team-viewer"], "role": "viewer", "team": TEAM}
        cfg["keys"]["k-team-app"] = {"token": TEAM_TOKENS["team-app"], "role": "service", "team": TEAM}
    if managed_keys:
        cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    return cfg


class Console:
    """The upstreams and the proxy, each on an event loop in a thread; `start()` then `send_traffic()`."""

    def __init__(self, workdir: Path, with_keys: bool = True, managed_keys: bool = False) -> None:
        self.workdir = workdir
        self.with_keys = with_keys
        self.managed_keys = managed_keys
        self.upstreams = {name: FaultUpstream.threaded() for name in ("primary", "backup", "cheap")}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ui-proxy", daemon=True)
        self._server: ProxyServer | None = None
        self.ledger: Ledger | None = None
        self.port = 0
        self.config_path = workdir / "edgeroute.yaml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Console:
        urls = {}
        for name, bg in self.upstreams.items():
            bg.start()
            urls[name] = bg.server.url
        data = config_data(urls, self.workdir / "ledger.db", self.with_keys, self.managed_keys)
        self.config_path.write_text(yaml.safe_dump(data))
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(30)
        return self

    async def _serve(self) -> int:
        cfg = config_mod.load(str(self.config_path))
        app = create_app(cfg, str(self.config_path))
        recorder = app[RECORDER]
        self.ledger = recorder if isinstance(recorder, Ledger) else None
        self._server = ProxyServer(app, cfg)
        await self._server.setup()
        await self._server.listen("127.0.0.1", 0)
        return self._server.port

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        for bg in self.upstreams.values():
            bg.stop()

    def client(self) -> openai.OpenAI:
        key = TOKENS["service"] if self.with_keys else "unused"
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def send_traffic(self) -> Traffic:
        """The known mix; returns once the ledger has written it."""
        t = Traffic()
        with self.client() as c:
            for i in range(8):
                if i % 3 == 0:
                    with c.chat.completions.create(
                        model="m", messages=HELLO, stream=True, stream_options={"include_usage": True}
                    ) as s:
                        for _ in s:
                            pass
                    t.streamed += 1
                else:
                    c.chat.completions.create(model="m", messages=HELLO)
                t.ok += 1
            primary = self.upstreams["primary"]
            primary.call_soon(lambda: primary.server.set_mode("503", count=2))
            for _ in range(2):
                raw = c.chat.completions.with_raw_response.create(model="m", messages=HELLO)
                t.failed_over.append(raw.headers["x-request-id"])
                t.ok += 1
            for _ in range(3):
                invoice = [{"role": "user", "content": "Total this invoice: 3 x 4"}]
                c.chat.completions.create(model="m", messages=invoice)
                t.by_rule += 1
                t.ok += 1
            pii = [{"role": "user", "content": "Mail the summary to alice@example.com please."}]
            raw = c.chat.completions.with_raw_response.create(model="m", messages=pii)
            t.with_pii = raw.headers["x-request-id"]
            t.ok += 1
        if self.with_keys:
            team_app = openai.OpenAI(
                base_url=self.url + "/v1", api_key=TEAM_TOKENS["team-app"], max_retries=0, timeout=20
            )
            with team_app:
                for _ in range(2):
                    team_app.chat.completions.create(model="cheap", messages=HELLO)
                    t.team += 1
                    t.ok += 1
        with self.client() as c:
            with contextlib.suppress(openai.NotFoundError):
                c.chat.completions.create(model="no-such-model", messages=HELLO)
            t.refused += 1
        self._wait_written(t.ok)
        return t

    def _wait_written(self, n: int) -> None:
        """Until the ledger has written the first `n` records (requests are sent one after
        another, so their records are queued, and written, in order)."""
        assert self.ledger is not None
        deadline = time.monotonic() + 60
        while self.ledger.written < n:
            assert time.monotonic() < deadline, f"the ledger wrote {self.ledger.written} of {n} records in 60 s"
            time.sleep(0.05)


def main() -> None:  # pragma: no cover - a developer's tool
    with tempfile.TemporaryDirectory() as tmp:
        console = Console(Path(tmp)).start()
        traffic = console.send_traffic()
        print(f"console: {console.url}/ui/  keys: {TOKENS}\ntraffic: {traffic}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            console.stop()


if __name__ == "__main__":
    main()
