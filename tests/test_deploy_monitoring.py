"""The Prometheus rules and Grafana dashboard in `deploy/` against a running proxy's /metrics.

No well-kept PromQL parser runs offline in Python, so each expression gets a careful
lexical check instead: brackets balance, label matchers are well formed, functions are
PromQL's, range selectors are durations, and every metric it names (a histogram's
`_bucket`/`_sum`/`_count` included) is exposed by edgeroute, with the labels it uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest
import yaml

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, simple_config
from tests.metrics_support import Scrape, scrape

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "edgeroute.json"

FUNCTIONS = {
    "rate", "irate", "increase", "delta", "sum", "avg", "max", "min", "count", "topk", "bottomk",
    "histogram_quantile", "label_values", "clamp_min", "clamp_max", "abs", "avg_over_time", "max_over_time",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
OTHER_METRICS = {"up"}  # Prometheus's own
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$|^\$__(rate_)?interval$")


def check_promql(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by `expr`; AssertionError on a malformed expression."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    in_str = False
    for ch in expr:
        if ch == '"':
            in_str = not in_str
        elif not in_str and ch in "([{":
            stack.append(ch)
        elif not in_str and ch in ")]}":
            assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {expr!r}"
    assert not stack and not in_str, f"unclosed bracket or string in {expr!r}"
    labels: set[str] = set()
    # Grafana's `label_values(metric, label)`: its second argument is a label.
    for lv in re.finditer(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", expr):
        labels.add(lv.group(2))
    expr = re.sub(r"(label_values\(\s*[\w:]+)\s*,\s*\w+\s*\)", r"\1)", expr)
    for body in re.findall(r"\{([^{}]*)\}", expr):
        for part in filter(str.strip, body.split(",")):
            m = _MATCHER.fullmatch(part)
            assert m, f"bad label matcher {part!r} in {expr!r}"
            labels.add(m.group(1))
            if m.group(2) in ("=~", "!~"):
                re.compile(m.group(3).replace("$route", ".*"))
    for d in re.findall(r"\[([^\[\]]*)\]", expr):
        assert _DURATION.match(d.strip()), f"bad range {d!r} in {expr!r}"
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^()]*)\)", expr):
        labels |= {x.strip() for x in grouping.split(",") if x.strip()}
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^{}]*\}|\[[^\[\]]*\]", " ", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^()]*\)", " ", bare)
    metrics: set[str] = set()
    for m in re.finditer(r"\$?\b([a-zA-Z_:][\w:]*)\b(\s*\()?", bare):
        name, call = m.group(1), m.group(2)
        if m.group(0).startswith("$") or name in KEYWORDS or re.fullmatch(r"\d.*|e\d+", name):
            continue
        if call:
            assert name in FUNCTIONS, f"unknown function {name!r} in {expr!r}"
        else:
            metrics.add(name)
    return metrics, labels


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert rules and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"
    for r in rules:
        if "for" in r:
            assert _DURATION.match(r["for"]), r["for"]
    return [r["expr"] for r in rules]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["panels"] and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def exposed(m: Scrape) -> tuple[set[str], set[str]]:
    """Names a query may use (histograms with their suffixes) and every label name exposed."""
    names: set[str] = set()
    for f in m.families.values():
        names |= {s.name for s in f.samples}
        if f.type == "counter":
            names.add(f.name + "_total")
        elif f.type == "histogram":
            names |= {f.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(f.name)
    labels = {k for f in m.families.values() for s in f.samples for k in s.labels}
    return names, labels


def test_the_checker_catches_mistakes() -> None:
    with pytest.raises(AssertionError):
        check_promql("sum(rate(x_total[5m])")
    with pytest.raises(AssertionError):
        check_promql('rate(x_total{route="a",}[5mins])')
    with pytest.raises(AssertionError):
        check_promql("rte(x_total[5m])")
    assert check_promql('sum by (route) (rate(a_total{status!="200"}[5m])) / b > 0.5') == (
        {"a_total", "b"},
        {"route", "status"},
    )


async def test_rules_and_dashboard_name_only_exposed_metrics(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"k": {"token": "tok-deploy-1", "team": "t"}, "prom": {"token": "tok-prom-1", "role": "viewer"}}
    cfg["budgets"] = {"limits": [{"name": "all", "scope": "global", "limit_usd": 10}]}
    cfg["ledger"] = {"backend": "sqlite", "path": str(tmp_path / "spend.db")}
    source = str(tmp_path / "edgeroute.yaml")
    server = ProxyTestServer(create_app(config_mod.parse(cfg, source), source), host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}"
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="tok-deploy-1", max_retries=0)
        msg = [{"role": "user", "content": "hi"}]
        await client.chat.completions.create(model="m", messages=msg)
        async for _ in await client.chat.completions.create(model="m", messages=msg, stream=True):
            pass
        await client.close()
        names, labels = exposed(await scrape(url, "tok-prom-1"))
    finally:
        await server.close()
    labels |= {"le", "budget", "error_class"}  # histogram buckets; families that had no sample in this run
    for expr in rule_exprs() + dashboard_exprs():
        used, used_labels = check_promql(expr)
        missing = {n for n in used if n.startswith("edgeroute_") and n not in names}
        assert not missing, f"{expr!r} names metrics edgeroute does not expose: {missing}"
        assert used <= names | OTHER_METRICS, f"{expr!r}: {used - names}"
        assert used_labels <= labels, f"{expr!r} uses labels edgeroute does not set: {used_labels - labels}"
