"""Spend reports: `edgeroute spend` and `GET /admin/spend`, with savings against the priciest model."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from edgeroute import cli
from edgeroute import config as config_mod
from edgeroute.cost import reports
from edgeroute.cost.reports import parse_since
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer
from tests.metrics_support import ledger_written
from tests.test_cost_support import CostProxy


def _cfg(base_url: str, db: Path) -> dict[str, Any]:
    return {
        "providers": {"a": {"base_url": base_url}},
        "deployments": {
            "big": {"provider": "a", "model": "gpt-4o", "price": "catalogue"},
            "small": {"provider": "a", "model": "gpt-4o-mini", "price": "catalogue"},
        },
        "models": {"m": {"deployments": ["big", "small"], "strategy": "lowest_cost"}},
        "keys": {
            "alice": {"token": "tok-alice", "team": "research"},
            "bob": {"token": "tok-bob", "team": "ops"},
            "root": {"token": "tok-root", "role": "admin"},
        },
        "ledger": {"path": db.name, "flush_interval": 0.1},  # relative to the config file
    }


async def test_spend_cli_and_admin_endpoint(start_upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    up = await start_upstream(reply_words=20)
    db = tmp_path / "spend.db"
    cfg_path = tmp_path / "edge.yaml"
    cfg_path.write_bytes(orjson.dumps(_cfg(up.base_url, db)))
    cfg = config_mod.load(cfg_path)
    server = ProxyTestServer(create_app(cfg, str(cfg_path)), host="127.0.0.1")
    await server.start_server()
    proxy = CostProxy(server, server.app)
    try:
        for token, n in (("tok-alice", 3), ("tok-bob", 1)):
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0)
            for _ in range(n):
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi there"}])
            await client.close()
        await ledger_written(proxy.url, 4, "tok-root")
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer tok-root"}) as s:
            async with s.get(proxy.url + "/admin/spend", params={"by": "team", "since": "1h"}) as r:
                assert r.status == 200
                report = await r.json()
            async with s.get(proxy.url + "/admin/spend", params={"by": "team; DROP TABLE spend"}) as r:
                assert r.status == 400
    finally:
        await server.close()
    assert db.exists()
    teams = {row["team"]: row for row in report["rows"]}
    assert teams["research"]["requests"] == 3 and teams["ops"]["requests"] == 1
    total = report["total"]
    assert total["cost_usd"] > 0 and total["baseline_cost_usd"] > total["cost_usd"]
    # gpt-4o-mini instead of gpt-4o: input 0.15 vs 2.50, output 0.60 vs 10.00 -> 94% saved.
    assert total["savings_percent"] == pytest.approx(94, abs=0.5)

    assert cli.main(["spend", "--config", str(cfg_path), "--by", "key", "--format", "json"]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert [r["key"] for r in out["rows"]] == ["alice", "bob"]
    assert out["total"]["requests"] == 4
    assert cli.main(["spend", "--config", str(cfg_path), "--by", "deployment", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('"deployment","requests","ok",') and lines[1].startswith('"small",4,4,')
    assert cli.main(["spend", "--config", str(cfg_path), "--by", "day", "--since", "7d"]) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and "savings vs. most expensive model" in table
    assert cli.main(["spend", "--config", str(cfg_path), "--since", "yesterday-ish"]) == 1
    assert "--since" in capsys.readouterr().err


async def test_spend_cli_reads_the_default_ledger(
    start_upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a `ledger:` section `serve` writes the default SQLite ledger beside the config; `spend` reads it."""
    up = await start_upstream()
    cfg_path = tmp_path / "edge.yaml"
    data = _cfg(up.base_url, tmp_path / "unused.db")
    del data["ledger"], data["keys"]
    cfg_path.write_bytes(orjson.dumps(data))
    server = ProxyTestServer(create_app(config_mod.load(cfg_path), str(cfg_path)), host="127.0.0.1")
    await server.start_server()
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        await server.close()  # closing flushes the ledger
    assert cli.main(["spend", "--config", str(cfg_path), "--format", "json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["total"]["requests"] == 1


def test_parse_since() -> None:
    now = 1_800_000_000.0
    assert parse_since("24h", now) == now - 86400
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2026-11-01") == 1_793_491_200.0
    assert parse_since(None) is None


def test_csv_cells_are_never_formulas_whatever_the_spreadsheets_separator() -> None:
    """redU L4: the guard checked a cell's start alone; a team admin's key named
    `ops;=2+5*cmd|' /C calc'!A0` was written bare, and a spreadsheet splitting on `;` (most of
    Europe's locales) read a cell starting with `=`: a formula. Every text cell is quoted now,
    and a formula's first character after any separator gets a `'`."""
    names = ["ops;=2+5*cmd|' /C calc'!A0", "a, -1+2", 'b;"@SUM(A1)', "c|+1", "d\t=1", "=HYPERLINK(1)", "plain"]
    zero = dict.fromkeys(reports.FIELDS, 0)
    report = {"by": "key", "rows": [{"key": f"k{i}", "name": n, **zero} for i, n in enumerate(names)]}
    out = reports.render(report, "csv")
    parsed = list(csv.reader(io.StringIO(out)))
    assert [r[1] for r in parsed[1:]][-1] == "plain" and parsed[1][1].startswith("ops;'=")
    for line in out.splitlines()[1:]:
        assert line.startswith('"k') and ',"' in line, line  # the text cells quoted, the numbers bare
        for cell in next(csv.reader([line])):  # a comma reader honours the quotes
            assert not cell.startswith(("=", "+", "-", "@")), (cell, line)
        for sep in ";|\t":  # others meet the quotes mid-field, and some split naively
            for cell in [*line.split(sep), *next(csv.reader([line], delimiter=sep))]:
                assert not cell.strip(" \"'").startswith(("=", "+", "-", "@")) or cell.lstrip(' "').startswith("'"), (
                    sep,
                    cell,
                    line,
                )


def test_csv_keeps_names_as_written_for_a_reader_that_honours_quotes() -> None:
    """red10 F6: `team-a,-dev` was exported as `team-a,'-dev` to every reader, even one
    honouring the quotes: a script joining the CSV to key ids or names saw another value. A comma inside a quoted cell
    splits nothing, so only a cell's start (and text after `;`, `|`, tab) is guarded."""
    names = {"team-a,-dev": "ops, -east", "-neg": "=1+2", "plain": "a,@b"}
    zero = dict.fromkeys(reports.FIELDS, 0)
    report = {"by": "key", "rows": [{"key": k, "name": n, **zero, "cost_usd": -0.5} for k, n in names.items()]}
    out = reports.render(report, "csv")
    parsed = list(csv.reader(io.StringIO(out), quoting=csv.QUOTE_NONNUMERIC))[1:]
    assert [(r[0], r[1]) for r in parsed] == [("team-a,-dev", "ops, -east"), ("'-neg", "'=1+2"), ("plain", "a,@b")]
    assert all(r[reports.FIELDS.index("cost_usd") + 2] == -0.5 for r in parsed)
