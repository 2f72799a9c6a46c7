"""`edgeroute prices list|show|update`: a newer catalogue (ours or LiteLLM's) checked, diffed,
written atomically where the proxy reads it, and priced by on the next config load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from edgeroute import config as config_mod
from edgeroute.config import price_catalogue as pc
from edgeroute.config import prices
from tests.conftest import Upstream
from tests.test_cli import run

DAY = "2026-12-01"


def _entry(**kw: Any) -> dict[str, Any]:
    return {"provider": "openai", "input": 1.0, "output": 2.0, "as_of": DAY, "source": "https://example.test/p", **kw}


def _write(path: Path, models: dict[str, Any], aliases: dict[str, str] | None = None) -> Path:
    path.write_text(json.dumps({"format": 2, "currency": "USD", "models": models, "aliases": aliases or {}}))
    return path


@pytest.fixture
def target(tmp_path: Path) -> dict[str, str]:
    return {"EDGEROUTE_PRICES": str(tmp_path / "state" / "prices.json")}


def test_update_diffs_writes_atomically_and_the_config_prices_by_it(tmp_path: Path, target: dict[str, str]) -> None:
    bundled = json.loads(prices.CATALOGUE_PATH.read_text())
    models = dict(bundled["models"])
    models["gpt-4o-mini"] = {**models["gpt-4o-mini"], "input": 0.2, "as_of": DAY}
    del models["gpt-3.5-turbo"]
    models["new-model"] = _entry(batch_input=0.5, batch_output=1.0)
    aliases = {k: v for k, v in bundled["aliases"].items()}
    new = _write(tmp_path / "new.json", models, aliases)

    dry = run("prices", "update", "--from", str(new), "--dry-run", env=target)
    assert dry.returncode == 0, dry.stderr
    assert "1 added, 1 changed, 1 removed" in dry.stdout
    assert "added: new-model" in dry.stdout and "removed: gpt-3.5-turbo" in dry.stdout
    assert "changed gpt-4o-mini: input 0.15 → 0.2" in dry.stdout
    assert not Path(target["EDGEROUTE_PRICES"]).exists()

    done = run("prices", "update", "--from", str(new), env=target)
    assert done.returncode == 0, done.stderr
    written = Path(target["EDGEROUTE_PRICES"])
    assert json.loads(written.read_text())["models"]["new-model"]["batch_input"] == 0.5
    assert [p.name for p in written.parent.iterdir()] == ["prices.json"]  # no temporary file left behind

    shown = run("prices", "show", "new-model", env=target)
    assert "batch_input:  0.5 USD per million tokens" in shown.stdout and "https://example.test/p" in shown.stdout
    assert "0 added, 0 changed, 0 removed" in run("prices", "update", "--from", str(new), env=target).stdout


def test_a_config_load_prices_by_the_updated_catalogue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: dict[str, str]
) -> None:
    monkeypatch.setenv("EDGEROUTE_PRICES", target["EDGEROUTE_PRICES"])
    cfg = {
        "providers": {"a": {"base_url": "http://127.0.0.1:1"}},
        "deployments": {"d": {"provider": "a", "model": "gpt-4o-mini", "price": "catalogue"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    assert config_mod.parse(cfg).deployments["d"].price.input_per_mtok == 0.15  # bundled
    pc.write_atomically(Path(target["EDGEROUTE_PRICES"]), {"models": {"gpt-4o-mini": _entry(input=0.3)}})
    p = config_mod.parse(cfg).deployments["d"].price
    assert (p.input_per_mtok, p.source) == (0.3, f"catalogue:gpt-4o-mini@{DAY}")
    pc.write_atomically(Path(target["EDGEROUTE_PRICES"]), {"models": {"gpt-4o-mini": _entry(input=0.4, note="x")}})
    assert config_mod.parse(cfg).deployments["d"].price.input_per_mtok == 0.4  # re-read when the file changes


async def test_the_proxy_charges_the_updated_price(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEROUTE_PRICES", str(tmp_path / "prices.json"))
    new = _write(tmp_path / "new.json", {"gpt-4o-mini": _entry(input=100.0, output=1000.0)})
    assert (
        run("prices", "update", "--from", str(new), env={"EDGEROUTE_PRICES": str(tmp_path / "prices.json")}).returncode
        == 0
    )
    up: Upstream = await start_upstream()
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": up.base_url, "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini", "price": "catalogue"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="x")
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    usage = raw.parse().usage
    assert usage is not None
    expected = (usage.prompt_tokens * 100.0 + usage.completion_tokens * 1000.0) / 1e6
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_entry(input=-1.0), "models.'bad'.input: must be a finite number >= 0 (got -1.0)"),
        ({k: v for k, v in _entry().items() if k != "output"}, "models.'bad': missing required price 'output'"),
        (_entry(output="2"), "models.'bad'.output: must be a number, not str"),
        (_entry(cached_input=float("nan")), "models.'bad'.cached_input: must be a finite number >= 0"),
        ({k: v for k, v in _entry().items() if k != "source"}, "models.'bad': missing 'source'"),
        (_entry(as_of="last week"), "models.'bad'.as_of: must be the date the prices were read"),
        (_entry(inputt=1.0), "models.'bad'.inputt: unknown field"),
    ],
)
def test_a_bad_entry_is_named_and_nothing_is_written(
    tmp_path: Path, target: dict[str, str], entry: dict[str, Any], message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"good": _entry(), "bad": entry}}).replace("NaN", "NaN"))
    r = run("prices", "update", "--from", str(bad), env=target)
    assert r.returncode == 1
    assert f"{bad}: {message}" in r.stderr
    assert "not loaded" in r.stderr and not Path(target["EDGEROUTE_PRICES"]).exists()


def test_unreadable_files_and_dangling_aliases_are_refused(tmp_path: Path, target: dict[str, str]) -> None:
    (tmp_path / "x.json").write_text("{not json")
    r = run("prices", "update", "--from", str(tmp_path / "x.json"), env=target)
    assert r.returncode == 1 and "cannot be read as JSON" in r.stderr
    _write(tmp_path / "a.json", {"m": _entry()}, {"alias": "gone"})
    r = run("prices", "update", "--from", str(tmp_path / "a.json"), env=target)
    assert "aliases.'alias': names 'gone', which is not in 'models'" in r.stderr
    r = run("prices", "update", "--from", str(tmp_path / "missing.json"), env=target)
    assert r.returncode == 1 and "missing.json" in r.stderr


def test_a_corrupt_updated_catalogue_fails_the_config_check_naming_the_file(
    tmp_path: Path, target: dict[str, str]
) -> None:
    path = Path(target["EDGEROUTE_PRICES"])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"models": {"gpt-4o": _entry(input=-3)}}))
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        "providers: {p: {base_url: 'http://127.0.0.1:9'}}\n"
        "deployments: {d: {provider: p, model: gpt-4o, price: catalogue}}\n"
        "models: {m: {deployments: [d]}}\n"
    )
    r = run("check", str(cfg), env=target)
    assert r.returncode == 1 and f"{path}: models.'gpt-4o'.input" in r.stderr


LITELLM = {
    "sample_spec": {"input_cost_per_token": 0.0, "litellm_provider": "one of ...", "mode": "one of ..."},
    "gpt-4o": {
        "input_cost_per_token": 2.5e-06,
        "output_cost_per_token": 1e-05,
        "cache_read_input_token_cost": 1.25e-06,
        "input_cost_per_token_batches": 1.25e-06,
        "output_cost_per_token_batches": 5e-06,
        "litellm_provider": "openai",
        "mode": "chat",
    },
    "amazon.titan-embed-text-v2:0": {
        "input_cost_per_token": 2e-08,
        "output_cost_per_token": 0.0,
        "litellm_provider": "bedrock",
        "mode": "embedding",
        "source": "https://aws.amazon.com/bedrock/pricing/",
    },
    "dall-e-3": {"litellm_provider": "openai", "mode": "image_generation", "output_cost_per_image": 0.04},
}


def test_litellm_price_list_is_imported_per_million_tokens_with_its_source(
    tmp_path: Path, target: dict[str, str]
) -> None:
    f = tmp_path / "model_prices_and_context_window.json"
    f.write_text(json.dumps(LITELLM))
    src = "LiteLLM model_prices_and_context_window.json @ abc123"
    r = run("prices", "update", "--from", str(f), "--merge", "--source", src, "--as-of", "2026-11-30", env=target)
    assert r.returncode == 0, r.stderr
    assert "2 text and embedding models; 1 other entries skipped" in r.stdout
    cat = json.loads(Path(target["EDGEROUTE_PRICES"]).read_text())
    g = cat["models"]["gpt-4o"]
    assert (g["input"], g["output"], g["cached_input"], g["batch_input"], g["batch_output"]) == (
        2.5,
        10.0,
        1.25,
        1.25,
        5.0,
    )
    assert (g["source"], g["as_of"]) == (src, "2026-11-30")
    t = cat["models"]["amazon.titan-embed-text-v2:0"]
    assert (t["mode"], t["input"], t["output"], t["provider"]) == ("embedding", 0.02, 0.0, "bedrock")
    assert "https://aws.amazon.com/bedrock/pricing/" in t["source"]
    assert "claude-3-haiku" in cat["models"] and cat["aliases"]  # --merge kept the rest


def test_litellm_negative_price_is_named(tmp_path: Path, target: dict[str, str]) -> None:
    f = tmp_path / "l.json"
    f.write_text(json.dumps({"x": {"input_cost_per_token": -1e-6, "litellm_provider": "openai", "mode": "chat"}}))
    r = run("prices", "update", "--from", str(f), env=target)
    assert r.returncode == 1 and "models.'x'.input: must be a finite number >= 0" in r.stderr
    r = run("prices", "update", "--from", str(f), "--as-of", "yesterday", env=target)
    assert r.returncode == 1 and "--as-of 'yesterday' is not a date" in r.stderr


def test_list_and_show(target: dict[str, str]) -> None:
    r = run("prices", "list", "--provider", "anthropic", env=target)
    assert r.returncode == 0 and "claude-3-5-haiku" in r.stdout and "gpt-4o" not in r.stdout
    rows = json.loads(run("prices", "list", "--format", "json", env=target).stdout)
    assert all(e["source"] and e["as_of"] for e in rows.values())
    r = run("prices", "show", "anthropic/claude-3-5-haiku-latest", env=target)
    assert "model:        claude-3-5-haiku" in r.stdout and "cache_write:" in r.stdout
    r = run("prices", "show", "gpt4o", env=target)
    assert r.returncode == 1 and "did you mean 'gpt-4o'" in r.stderr


def test_the_bundled_catalogue_is_valid_dated_and_sourced() -> None:
    cat = prices.read_catalogue(prices.CATALOGUE_PATH)
    assert pc.dumps(cat) == prices.CATALOGUE_PATH.read_text()  # one entry per line, as `update` writes it


def test_a_failed_write_leaves_the_previous_catalogue_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "prices.json"
    pc.write_atomically(target, {"models": {"m": _entry()}})
    before = target.read_text()

    def boom(data: dict[str, Any]) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(pc, "dumps", boom)
    with pytest.raises(OSError):
        pc.write_atomically(target, {"models": {"m": _entry(input=9.0)}})
    assert target.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["prices.json"]


def test_an_update_that_would_break_the_config_is_refused(tmp_path: Path, target: dict[str, str]) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(
        "providers: {p: {base_url: 'http://127.0.0.1:9'}}\n"
        "deployments:\n"
        "  a: {provider: p, model: gpt-4o, price: catalogue}\n"
        "  b: {provider: p, model: x, price: {catalogue: claude-3-haiku-20240307, output_per_mtok: 1}}\n"
        "  c: {provider: p, model: y, price: {input_per_mtok: 1}}\n"
        "models: {m: {deployments: [a, b, c]}}\n"
    )
    new = _write(tmp_path / "new.json", {"gpt-4o": _entry()})  # no Claude: b's reference would break
    r = run("prices", "update", "--from", str(new), "--config", str(cfg), env=target)
    assert r.returncode == 1 and not Path(target["EDGEROUTE_PRICES"]).exists()
    assert f"{cfg}:4:" in r.stderr  # where it is, as `edgeroute check` says it
    assert "deployments.b.price: model 'claude-3-haiku-20240307' is not in the new catalogue" in r.stderr
    assert "deployments.a" not in r.stderr and "deployments.c" not in r.stderr
    r = run("prices", "update", "--from", str(new), "--force", env={**target, "EDGEROUTE_CONFIG": str(cfg)})
    assert r.returncode == 0 and Path(target["EDGEROUTE_PRICES"]).exists()
    ok = _write(
        tmp_path / "ok.json",
        {"gpt-4o": _entry(), "claude-3-haiku": _entry()},
        {"claude-3-haiku-20240307": "claude-3-haiku"},
    )
    assert run("prices", "update", "--from", str(ok), "--config", str(cfg), env=target).returncode == 0
