"""`edgeroute demo`: the proxy on bundled mock providers, with a guided tour.

Starts three mock OpenAI-format providers and the proxy on the bundled demo config,
sends a few requests that show routing (weights, cheapest model, rules on content,
PII kept in the EU, failover during an outage), prints what happened, and keeps
serving so that the user can try it with curl or the openai SDK.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from importlib import resources
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.cost import reports
from edgeroute.cost.ledger import Ledger
from edgeroute.http_server import ProxyServer
from edgeroute.mock.openai import MockOptions, build_app
from edgeroute.server import create_app, install_uvloop
from edgeroute.state import RECORDER

_MOCKS = {"openai-us": "mock-openai-us", "openai-eu": "mock-openai-eu", "budget-llm": "mock-budget"}


async def _start(app: web.Application, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1] if sockets else port


def demo_config_data() -> dict[str, Any]:
    text = resources.files("edgeroute").joinpath("data/demo.yaml").read_text()
    data: dict[str, Any] = yaml.safe_load(text)
    return data


async def _tour(base: str, mocks: dict[str, MockOptions], ledger: Ledger, *, serving: bool) -> None:
    hdr = {"Authorization": "Bearer anything", "Content-Type": "application/json"}
    rows: list[tuple[str, str, str, str, str, str]] = []

    async with aiohttp.ClientSession() as s:

        async def ask(title: str, model: str, prompt: str, *, stream: bool = False, tags: str | None = None) -> None:
            body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
            if stream:
                body["stream"] = True
                body["stream_options"] = {"include_usage": True}
            h = dict(hdr)
            if tags:
                h["x-edgeroute-tags"] = tags
            t0 = time.perf_counter()
            async with s.post(f"{base}/v1/chat/completions", data=orjson.dumps(body), headers=h) as r:
                text = await r.text()
                ms = (time.perf_counter() - t0) * 1000
                answer = ""
                if r.status == 200 and not stream:
                    answer = orjson.loads(text)["choices"][0]["message"]["content"] or ""
                elif r.status == 200:
                    answer = f"{text.count('data: ') - 1} SSE chunks"
                else:
                    answer = orjson.loads(text)["error"]["message"]
                rows.append(
                    (
                        title,
                        r.headers.get("x-edgeroute-deployment", "-"),
                        r.headers.get("x-edgeroute-rule", "(default)"),
                        r.headers.get("x-edgeroute-attempts", "-"),
                        f"{ms:6.1f} ms",
                        answer[:48],
                    )
                )

        for i in range(4):
            await ask(f"weighted 3:1 #{i + 1}", "gpt-4o", "Summarise the plot of Hamlet in two lines.")
        await ask("cheapest deployment", "gpt-4o-mini", "Write a haiku about routers.")
        await ask("rule: short chat", "gpt-4o-mini", "hi, thanks!")
        await ask("rule: PII stays in EU", "gpt-4o", "Email jane.doe@example.com my invoice")
        await ask("header tag eu", "gpt-4o", "Bonjour", tags="eu")
        await ask("streaming", "gpt-4o-mini", "Stream me a sentence.", stream=True)
        mocks["openai-us"].fail_status = 503
        await ask("outage at openai-us", "gpt-4o", "Are you there?")
        mocks["openai-us"].fail_status = None
        async with s.post(
            f"{base}/v1/route/explain",
            data=orjson.dumps(
                {"model": "gpt-4o", "messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]}
            ),
            headers=hdr,
        ) as resp:
            explained = await resp.json()

    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    heads = ("request", "served by", "rule", "tries", "latency", "answer")
    widths = [max(w, len(h)) for w, h in zip(widths, heads, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))
    print("\nGuided tour — what edgeroute did:\n")
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(
        f"\nPOST /v1/route/explain for a prompt with a card number -> {explained['deployment']} "
        f"(rule {explained['rule']}: {'; '.join(explained['reasons'])})"
    )
    # The spend ledger (SQLite, written off the request path): what the tour cost, and what it saved.
    await asyncio.to_thread(ledger.flush)
    # The curl hint only while the demo keeps serving: after --tour-only it would name a closed port.
    hint = f" (while it runs: curl -s '{base}/admin/spend?by=model')" if serving else ""
    print(f"\nSpend by model, from the demo's ledger{hint}:\n")
    print(reports.render(reports.spend(ledger.backend, by="model"), "table"))


def _banner(base: str) -> str:
    return f"""
edgeroute demo is running at {base}  (Ctrl-C to stop)

Try it (paste into a shell):
curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "Hello!"}}]}}' -i

# the openai SDK (pip install openai):
python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="unused")
r = client.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello!"}}])
print(r.headers["x-edgeroute-deployment"], r.parse().choices[0].message.content)
PY

curl -s {base}/admin/deployments      # health, latency and error rate per deployment
curl -s '{base}/admin/spend?by=model'  # spend and savings from the demo's ledger
curl -s {base}/v1/models
"""


async def _main(port: int, tour_only: bool) -> int:
    data = demo_config_data()
    runners: list[web.AppRunner] = []
    mocks: dict[str, MockOptions] = {}
    for provider, name in _MOCKS.items():
        opts = MockOptions(name=name, latency_ms=20, chunk_interval=0.01)
        runner, mport = await _start(build_app(opts), 0)
        runners.append(runner)
        mocks[provider] = opts
        data["providers"][provider]["base_url"] = f"http://127.0.0.1:{mport}/v1"
    spend_dir = tempfile.TemporaryDirectory(prefix="edgeroute-demo-")
    data["ledger"] = {"backend": "sqlite", "path": f"{spend_dir.name}/spend.db", "flush_interval": 0.2}
    cfg = config_mod.parse(data, "edgeroute/data/demo.yaml")
    app = create_app(cfg, "demo")
    ledger = app[RECORDER]
    assert isinstance(ledger, Ledger)
    # The proxy is served as `edgeroute serve` serves it (its connection protocol: header
    # timeout, strict parser, connection cap); the mocks by aiohttp's own runner.
    proxy = ProxyServer(app, cfg, shutdown_timeout=1.0)
    await proxy.setup()
    try:
        await proxy.listen("127.0.0.1", port)
    except OSError as e:
        # The error's strerror may repeat the address ("error while attempting to bind on address ...").
        why = os.strerror(e.errno) if e.errno else str(e)
        print(
            f"edgeroute demo: cannot listen on 127.0.0.1:{port}: {why}; try `edgeroute demo --port 0`", file=sys.stderr
        )
        await proxy.cleanup()
        for r in runners:
            await r.cleanup()
        spend_dir.cleanup()
        return 1
    base = f"http://127.0.0.1:{proxy.port}"
    try:
        await _tour(base, mocks, ledger, serving=not tour_only)
        if tour_only:
            return 0
        stop = asyncio.Event()
        # SIGTERM (`timeout`, `kill`, a service manager) ends the demo as Ctrl-C does: the finally
        # below removes its temporary ledger.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(_banner(base), flush=True)
        await stop.wait()
    finally:
        await proxy.cleanup()
        for r in reversed(runners):
            await r.cleanup()
        spend_dir.cleanup()
    return 0


def run_demo(port: int = 8080, tour_only: bool = False) -> int:
    install_uvloop()
    try:
        return asyncio.run(_main(port, tour_only))
    except KeyboardInterrupt:
        return 0
