"""A fifth new operator's walk through the README, adopting edgeroute for a company: two
providers (OpenAI and Anthropic) tried on mock upstreams, managed keys for two teams, team
budgets with actions, a rule, the request log, alerts, the cache and the console. Each test
drives the real parts (the openai SDK against the proxy, the CLI in a subprocess) and asserts
what the operator or the client sees."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.test_cost_support import cost_proxy, one_deployment
from tests.test_operator_walk2 import _stop
from tests.test_operator_walk3 import ONE_MODEL, _cli, _env, _serve, _term, _write
from tests.test_operator_walk4 import ROOT, _create, _managed

# -- a budget that refuses a request for its worst case -------------------------------------------

# Output at $2 per million tokens (input free): a request that sets no max_tokens reserves
# `budgets.reserve_max_tokens` (4,096) output tokens, $0.008192; the budget is half that.
LIMIT = 0.004


async def test_a_budget_with_room_left_says_why_it_refused_and_what_reserves_less(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A team budget at 0 % spent refused every request that set no max_tokens with "Budget
    'b' for all requests is exhausted: $0.00 of $0.00400 spent or reserved": the caller saw a
    budget called exhausted that had spent nothing, and nothing it could change. It says what
    is left, what the request may cost and that a lower max_tokens reserves less; a request
    with one is then served."""
    up = await start_upstream()
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={"limits": [{"name": "b", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
    )
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        msg: list[Any] = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="m", messages=msg)
        said = refused.value.message
        assert "exhausted" not in said, said
        assert "Budget 'b' for all requests has $0.00400 left ($0.00 of $0.00400 spent" in said, said
        assert "up to $0.00819 for its prompt and 4,096 output tokens (it set no max_tokens)" in said, said
        assert "A lower max_tokens reserves less." in said, said
        answer = await client.chat.completions.create(model="m", messages=msg, max_tokens=20)
        assert answer.choices[0].message.content
        await client.close()


# -- trying an Anthropic provider without its key ----------------------------------------------------


def _mock(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """`edgeroute bench mock FLAGS --port 0`, and the base_url it says to configure."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "bench", "mock", "--port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert re.fullmatch(r"listening port=\d+\n", proc.stdout.readline())
    said = proc.stderr.readline()
    m = re.search(r"base_url: (http://127\.0\.0\.1:\d+\S*)$", said)
    assert m, said
    return proc, m[1]


def _served(tmp_path: Path, text: str, asks: list[dict[str, Any]]) -> Path:
    """A config of provider `openai` (a `bench mock`) and `text`, served while the openai SDK
    asks each of `asks` ("hi"), then drained (its ledger flushed); the config's path."""
    mock, base_url = _mock()
    cfg = _write(tmp_path, f'providers:\n  openai: {{base_url: "{base_url}", api_key: unused}}\n' + text)
    try:
        proc, url = _serve(cfg)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for ask in asks:
                client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **ask)
        finally:
            _term(proc)  # drains and flushes the ledger
    finally:
        _stop(mock)
    return cfg


def test_an_anthropic_provider_can_be_tried_on_a_mock_as_the_readme_says(tmp_path: Path) -> None:
    """The README sends an operator to `edgeroute bench mock --port 0` to try a config without
    provider keys, but that mock speaks OpenAI's API alone: a provider with `kind: anthropic`
    (the README's own Uptime example) had nothing to point at (`POST /v1/messages` was a 404).
    `--kind anthropic` serves Anthropic's API, and the mock says the base_url to configure."""
    mock, base_url = _mock("--kind", "anthropic", "--api-key", "sk-ant-walk5")
    try:
        assert base_url.endswith(tuple("0123456789")), base_url  # Anthropic's base_url has no /v1
        cfg = _write(
            tmp_path,
            f"""\
providers:
  anthropic: {{kind: anthropic, base_url: "{base_url}", api_key: sk-ant-walk5}}
deployments:
  claude-sonnet-anthropic: {{provider: anthropic, model: claude-sonnet-4-5, price: catalogue}}
models:
  claude-sonnet: {{deployments: [claude-sonnet-anthropic]}}
""",
        )
        proc, url = _serve(cfg)
        try:
            m = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0).messages.create(
                model="claude-sonnet", max_tokens=50, messages=[{"role": "user", "content": "Hello!"}]
            )
            assert m.content[0].type == "text" and "claude-sonnet-4-5" in m.content[0].text, m
            chat = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
                model="claude-sonnet", messages=[{"role": "user", "content": "Hello!"}]
            )
            assert chat.choices[0].message.content, chat
        finally:
            _term(proc)
    finally:
        _stop(mock)


def test_a_fault_flag_with_another_kind_of_mock_is_named() -> None:
    """Fault injection is the OpenAI mock's: asked of another kind, the flag is named (exit 2)."""
    r = _cli("bench", "mock", "--kind", "anthropic", "--error-rate", "0.5")
    assert r.returncode == 2, r
    assert "--error-rate: fault injection is the OpenAI mock's (--kind openai), not anthropic's" in r.stderr


# -- edgeroute logs: a deployment's name as long as the README's ----------------------------------


def test_the_logs_table_fits_a_deployment_named_as_in_the_readme(tmp_path: Path) -> None:
    """The README names deployments `claude-sonnet-anthropic` (23 characters) and
    `gpt-4o-mini-openai` (18); the deployment column was 14 wide, so on their rows every column
    after it stood right of its header (walks 1 and 4 widened the id and key columns one at a
    time). Each column is now as wide as the page's longest cell."""
    asks = [{"model": "gpt-4o-mini"}, {"model": "claude-sonnet"}]
    cfg = _served(
        tmp_path,
        """\
deployments:
  gpt-4o-mini-openai: {provider: openai, model: gpt-4o-mini, price: catalogue}
  claude-sonnet-anthropic: {provider: openai, model: claude-sonnet-4-5, price: catalogue}
models:
  gpt-4o-mini: {deployments: [gpt-4o-mini-openai]}
  claude-sonnet: {deployments: [claude-sonnet-anthropic]}
""",
        asks,
    )
    r = _cli("logs", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert len(rows) == 2, r.stdout
    for row in rows:
        for column in ("model", "deployment", "key", "status", "latency_ms", "tokens", "attempts"):
            at = header.index(column)
            assert row[at - 2 : at] == "  " and row[at] != " ", (column, r.stdout)
        assert row[header.index("status") :].startswith("200"), r.stdout


# -- spend by route: a request no route served ---------------------------------------------------


def test_spend_by_route_names_the_requests_no_route_served(tmp_path: Path) -> None:
    """A request for a model the gateway does not serve (a client's typo) has no route: `spend
    --by route` printed its row with a blank first cell, and the console's "Savings by route" a
    row without a name. It is `(unrouted)`, as `stats` calls it."""
    cfg = _write(tmp_path, ONE_MODEL)
    proc, url = _serve(cfg)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o-typo", messages=[{"role": "user", "content": "hi"}])
    finally:
        _term(proc)
    r = _cli("spend", "-c", str(cfg), "--by", "route")
    assert r.returncode == 0, r.stderr
    header, row, total = [x for x in r.stdout.splitlines() if x.strip()][:3]
    assert header.split()[:2] == ["route", "requests"] and row.split()[:2] == ["(unrouted)", "1"], r.stdout
    assert total.split()[:2] == ["TOTAL", "1"], r.stdout


# -- a team's admin key makes its team's keys ------------------------------------------------------


def test_a_team_admin_key_makes_keys_of_its_team_without_naming_it(tmp_path: Path) -> None:
    """A team's admin key may create keys of its own team alone, yet `keys create` without
    `--team` was refused (`error: 403: The new key must keep this key's team 'research'.`),
    asking for the one value allowed. The new key is of the maker's team; another team is
    still refused."""
    proc, url = _serve(_managed(tmp_path))
    try:
        lead = _create(url, "--team", "research", "--role", "admin", "--name", "research-admin")
        as_lead = _env(EDGEROUTE_URL=url, EDGEROUTE_ADMIN_KEY=lead["secret"])
        r = _cli("keys", "create", "--name", "research-app", env=as_lead)
        assert r.returncode == 0, r.stderr
        made = json.loads(r.stdout)
        assert made["team"] == "research" and made["parent"] == lead["id"], made
        other = _cli("keys", "create", "--team", "support", env=as_lead)
        assert other.returncode == 1 and "must keep this key's team 'research'" in other.stderr, other
    finally:
        _term(proc)


# -- POST /admin/config/check (the console's "Check a configuration") ----------------------------

WEBHOOKS = """\
budgets:
  limits:
    - {name: research-monthly, scope: team, match: research, limit_usd: 100,
       actions: [{at_percent: 50, action: notify, webhook: env:BUDGET_HOOK}]}
alerts:
  webhooks:
    ops: {url: env:OPS_HOOK}
    chat: {url: "file:/run/secrets/slack-url", format: slack}
"""


def _check(url: str, text: str) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/admin/config/check", data=text.encode(), method="POST",
        headers={"Authorization": f"Bearer {ROOT}", "Content-Type": "application/yaml"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


def test_the_api_check_takes_webhooks_given_by_reference(tmp_path: Path) -> None:
    """The README advises giving alert and budget webhooks as references (`env:NAME`), and
    says the API's check reads no reference, checking its form only; yet the check answered
    such a config `a webhook URL starts with http:// or https://` for each of them, taking
    the reference's own text for the URL: the console's "Check a configuration" refused the
    running config. A literal URL that is not one is still refused."""
    proc, url = _serve(_managed(tmp_path))
    try:
        text = (tmp_path / "edge.yaml").read_text() + WEBHOOKS
        assert _check(url, text) == {"ok": True, "errors": [], "references": "unresolved"}
        bad = _check(url, text.replace("env:OPS_HOOK", "ftp://hooks.example.com/x"))
        assert bad["ok"] is False and len(bad["errors"]) == 1, bad
        assert bad["errors"][0].endswith("alerts.webhooks.ops.url: a webhook URL starts with http:// or https://"), bad
    finally:
        _term(proc)


# -- the console's page of one request ---------------------------------------------------------------


def _logged(url: str, request_id: str) -> None:
    """Until the request log has the request (written in the ledger's batches)."""
    req = urllib.request.Request(f"{url}/admin/requests/{request_id}", headers={"Authorization": f"Bearer {ROOT}"})
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(req, timeout=10):
                return
        except urllib.error.HTTPError as e:
            if e.code != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _logged_anonymous(url: str, n: int) -> None:
    """Until the request log of a gateway without keys (loopback) holds `n` requests."""
    deadline = time.monotonic() + 20
    while True:
        with urllib.request.urlopen(url + "/admin/requests", timeout=10) as r:
            if len(json.loads(r.read())["data"]) >= n or time.monotonic() > deadline:
                return
        time.sleep(0.1)


def test_the_console_shows_a_cache_hit_and_a_fast_request_as_they_were(tmp_path: Path) -> None:
    """A request's page in the console said of a cache hit (status 200, `Cache: hit`) "No
    attempt reached an upstream (refused before dispatch)"; showed the difficulty with 17
    digits (`0.13155478841026258`); and labelled the time axis of a request under a
    millisecond (as a mock upstream answers) `0 ms, 0 ms, 0 ms, 1 ms, 1 ms, 1 ms`."""
    from tests.ui.conftest import need_browser

    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.ui.browser import console_errors, navigate, start_browser, wait_idle

    mock, base_url = _mock()
    text = f"""\
providers:
  openai: {{base_url: "{base_url}", api_key: unused}}
deployments:
  gpt-4o-openai: {{provider: openai, model: gpt-4o, price: catalogue}}
models:
  gpt-4o: {{deployments: [gpt-4o-openai], cache: {{ttl: 300}}}}
rules:  # a rule on the task type: the decision predicts it, and the difficulty with it
  - {{name: code, when: {{tasks: [code]}}, then: {{route: gpt-4o}}}}
keys:
  root: {{token: {ROOT}, role: admin}}
"""
    drv = None
    try:
        proc, url = _serve(_write(tmp_path, text))
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key=ROOT, max_retries=0)
            ids, labels = [], []
            for _ in range(2):
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-4o", temperature=0, messages=[{"role": "user", "content": "Name a mountain."}]
                )
                ids.append(raw.headers["x-request-id"])
                labels.append(raw.headers["x-edgeroute-cache"])
            assert labels == ["miss", "hit"]
            drv = start_browser()
            drv.get(url + "/ui/")
            WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.ID, "key"))
            drv.find_element(By.ID, "key").send_keys(ROOT)
            drv.find_element(By.ID, "signin").click()
            WebDriverWait(drv, 10).until(lambda d: d.find_element(By.ID, "nav").is_displayed())

            def page(request_id: str) -> str:
                _logged(url, request_id)
                navigate(drv, functools.partial(drv.get, f"{url}/ui/#/requests/{request_id}"))
                wait_idle(drv)
                assert console_errors(drv) == [], request_id
                return str(drv.find_element(By.ID, "main").text)

            hit = page(ids[1])
            assert "refused before dispatch" not in hit, hit
            assert "Answered from the response cache (hit): no upstream was called." in hit, hit
            assert re.search(r"^Difficulty\n(0|1|0\.\d{1,2})$", hit, re.M), hit

            page(ids[0])
            ticks = [t.text for t in drv.find_elements(By.CSS_SELECTOR, "svg .axis text")]
            assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
        finally:
            _term(proc)
    finally:
        if drv is not None:
            drv.quit()
        _stop(mock)


def test_the_logs_table_says_which_requests_the_cache_answered(tmp_path: Path) -> None:
    """A request the response cache answered showed in `edgeroute logs` as a 200 with 0
    attempts, 0/0 tokens and $0, like nothing else in the table and with nothing saying why
    (the README says the request log carries the cache status). The table has a cache column."""
    ask = {"model": "gpt-4o", "temperature": 0}
    cfg = _served(
        tmp_path,
        """\
deployments:
  gpt-4o-openai: {provider: openai, model: gpt-4o, price: catalogue}
models:
  gpt-4o: {deployments: [gpt-4o-openai], cache: {ttl: 300}}
""",
        [ask, ask],
    )
    r = _cli("logs", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    at = header.index("cache")
    assert [(row[at:].split()[0], row[header.index("attempts") :].split()[0]) for row in rows] == [
        ("miss", "1"),
        ("hit", "0"),
    ], r.stdout


def test_a_followed_record_keeps_the_columns_of_the_table(tmp_path: Path) -> None:
    """`edgeroute logs --follow` sized its columns to the first page, so a record that came
    later from a deployment with a longer name (`claude-sonnet-anthropic`) stood right of the
    header. Columns fit every model and deployment name of the config from the start."""
    mock, base_url = _mock()
    cfg = _write(
        tmp_path,
        f"""\
providers:
  openai: {{base_url: "{base_url}", api_key: unused}}
deployments:
  mini: {{provider: openai, model: gpt-4o-mini, price: catalogue}}
  claude-sonnet-anthropic: {{provider: openai, model: claude-sonnet-4-5, price: catalogue}}
models:
  mini: {{deployments: [mini]}}
  claude-sonnet: {{deployments: [claude-sonnet-anthropic]}}
""",
    )
    follow = None
    try:
        proc, url = _serve(cfg)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            client.chat.completions.create(model="mini", messages=[{"role": "user", "content": "hi"}])
            _logged_anonymous(url, 1)
            follow = subprocess.Popen(
                [sys.executable, "-m", "edgeroute", "logs", "-c", str(cfg), "--follow"],
                stdout=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
            )  # fmt: skip
            assert follow.stdout is not None
            header, first = follow.stdout.readline(), follow.stdout.readline()
            client.chat.completions.create(model="claude-sonnet", messages=[{"role": "user", "content": "hi"}])
            later = follow.stdout.readline()  # printed within the follow's poll (1 s) of being logged
        finally:
            _term(proc)
    finally:
        if follow is not None:
            _stop(follow)
        _stop(mock)
    assert "claude-sonnet-anthropic" in later, later
    for row in (first, later):
        for column in ("key", "status", "latency_ms", "attempts"):
            at = header.index(column)
            assert row[at - 2 : at] == "  " and row[at] != " ", (column, header, first, later)


# -- a budget's downgrade, explained --------------------------------------------------------------


async def test_a_downgraded_request_s_explanation_says_so(start_upstream: Any, tmp_path: Path) -> None:
    """Past a budget's `downgrade` threshold a request for `gpt-4o` was served by `gpt-4o-mini`
    and `x-edgeroute-explain` said `route=gpt-4o-mini; rule=default; why=default route for
    model=gpt-4o-mini`: the explanation of a request for the model it was sent to, as if the
    client had asked for it, with nothing naming the budget. It says what was done and why."""
    up = await start_upstream()
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={
            "limits": [
                {"name": "research-monthly", "scope": "global", "limit_usd": 0.00004,
                 "actions": [{"at_percent": 50, "action": "downgrade", "to": "gpt-4o-mini"}]}
            ]
        },
    )  # fmt: skip
    cfg["models"] = {"gpt-4o": {"deployments": ["d-a"]}, "gpt-4o-mini": {"deployments": ["d-mini"]}}
    cfg["deployments"]["d-mini"] = {
        "provider": "a",
        "model": "gpt-4o-mini",
        "price": {"input_per_mtok": 0, "output_per_mtok": 0.5},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        explained = []
        for _ in range(3):  # the first answer's 10-20 tokens at $2 per million take it past 50 %
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=20
            )
            explained.append((raw.headers["x-edgeroute-route"], raw.headers["x-edgeroute-explain"]))
        await client.close()
    assert [route for route, _ in explained] == ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini"], explained
    assert "downgraded" not in explained[0][1], explained
    for _, why in explained[1:]:
        assert why.startswith("route=gpt-4o-mini;") and "; downgraded from gpt-4o by budget research-monthly" in why


def test_each_chart_of_a_deployment_s_history_says_what_it_draws(tmp_path: Path) -> None:
    """The console's Deployments page draws three charts per deployment under "History": only
    the latency chart named its lines (p50, p95); the error-rate and in-flight charts were bare
    axes (0-100 %, 0-1) with nothing on the page saying what they were."""
    from tests.ui.conftest import need_browser

    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.ui.browser import console_errors, navigate, start_browser, wait_idle

    proc, url = _serve(_write(tmp_path, ONE_MODEL))
    drv = None
    try:
        drv = start_browser()

        def drawn(d: Any) -> bool:  # the history has its first sample 5 s after the start
            navigate(d, functools.partial(d.get, f"{url}/ui/#/deployments?at={time.monotonic()}"))
            wait_idle(d)
            return bool(d.find_elements(By.CSS_SELECTOR, ".grid3 .chart"))

        WebDriverWait(drv, 30, poll_frequency=1).until(drawn, "no history drawn")
        charts = drv.find_elements(By.CSS_SELECTOR, ".grid3 .chart")
        named = [[li.text for li in c.find_elements(By.CSS_SELECTOR, ".legend li")] for c in charts]
        assert named == [["error rate"], ["p50", "p95"], ["in flight"]], named
        assert console_errors(drv) == []
    finally:
        if drv is not None:
            drv.quit()
        _term(proc)


def test_spend_by_key_names_each_managed_key(tmp_path: Path) -> None:
    """`edgeroute spend --by key` (and `GET /admin/spend?by=key`, the console's Key tab) listed
    managed keys by id alone (`k230dcccb1b60`): the operator who created `research-app` had to
    look each id up in `keys list`. Each row has the key's name."""
    proc, url = _serve(_managed(tmp_path))
    try:
        made = _create(url, "--team", "research", "--name", "research-app")
        client = openai.OpenAI(base_url=url + "/v1", api_key=made["secret"], max_retries=0)
        with pytest.raises(openai.APIStatusError):  # its one upstream refuses every connection
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        req = urllib.request.Request(url + "/admin/spend?by=key", headers={"Authorization": f"Bearer {ROOT}"})
        deadline = time.monotonic() + 20
        while True:  # the ledger writes in batches
            with urllib.request.urlopen(req, timeout=30) as r:
                rows = json.loads(r.read())["rows"]
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [(row["key"], row["name"]) for row in rows] == [(made["id"], "research-app")], rows
    finally:
        _term(proc)
    r = _cli("spend", "-c", str(tmp_path / "edge.yaml"), "--by", "key")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:3] == ["key", "name", "requests"], r.stdout
    assert row.split()[:3] == [made["id"], "research-app", "1"], r.stdout
