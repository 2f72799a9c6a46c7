"""A fourth new operator's walk through the README: the request log and analytics, alerts,
governance (managed keys, roles, versions, audit) and the web console, run as printed. Each
test runs the real CLI (or `edgeroute serve` with the openai SDK as its client) in a
subprocess, or the console in headless Chromium, and asserts what the operator sees."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai

from tests.conftest import eventually, start_routes
from tests.governance_support import call
from tests.readme_pages import manual_text
from tests.test_operator_walk3 import ONE_MODEL, _cli, _closed_url, _env, _serve, _term, _write

ROOT = "root-token-walk4"
MANAGED = (
    ONE_MODEL
    + f"keys:\n  root: {{token: {ROOT}, role: admin}}\n"
    + "governance: {managed_keys: true, key_poll_interval: 0.25}\n"
)


def _managed(tmp_path: Path) -> Path:
    """A config with managed keys whose one deployment's upstream refuses every connection."""
    return _write(tmp_path, MANAGED.replace("http://127.0.0.1:9/v1", _closed_url()))


def _admin_env(url: str) -> dict[str, str]:
    return _env(EDGEROUTE_URL=url, EDGEROUTE_ADMIN_KEY=ROOT)


def _create(url: str, *flags: str) -> dict[str, Any]:
    r = _cli("keys", "create", *flags, env=_admin_env(url))
    assert r.returncode == 0, r.stderr
    made: dict[str, Any] = json.loads(r.stdout)
    return made


# -- GET /admin/budgets: a managed key's limits ------------------------------------------------------


async def test_budgets_show_a_managed_keys_limits_as_they_are_now(tmp_path: Path) -> None:
    """`keys create --max-parallel 3` then `GET /admin/budgets`: the key's row had no
    `max_parallel` nor `in_flight` (the README says a key's row has both; only config keys'
    had them), and after `keys update --rpm 30` it still said `rpm_limit: 60` until the key's
    next request (the bucket's limit, not the key's)."""
    cfg = _managed(tmp_path)
    proc, url = _serve(cfg)
    try:
        made = _create(url, "--rpm", "60", "--max-parallel", "3")
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=made["secret"], max_retries=0)
        try:  # nothing listens upstream: a 502, but the request took from the key's RPM
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            assert e.status_code == 502, e
        finally:
            await client.close()

        async def row() -> dict[str, Any]:
            status, report = await call("GET", url + "/admin/budgets", ROOT)
            assert status == 200, report
            rows = {(r["scope"], r["name"]): r for r in report["rate_limits"]}
            got: dict[str, Any] = rows[("key", made["id"])]
            return got

        first = await row()
        assert (first["rpm_limit"], first["max_parallel"], first["in_flight"]) == (60, 3, 0), first
        assert first["rpm_used"] > 0, first
        r = await asyncio.to_thread(_cli, "keys", "update", made["id"], "--rpm", "30", env=_admin_env(url))
        assert r.returncode == 0, r.stderr

        async def lowered() -> dict[str, Any] | None:
            got = await row()
            return got if got["rpm_limit"] == 30 else None

        assert (await eventually(lowered, "the key's new rpm in /admin/budgets", within=10))["max_parallel"] == 3
    finally:
        _term(proc)


# -- edgeroute logs: a managed key's id -----------------------------------------------------------


async def test_the_logs_table_keeps_its_columns_for_a_managed_key(tmp_path: Path) -> None:
    """A managed key's id (`k` and 12 hex digits) is 13 characters; the key column was 10, so
    every column after it stood three characters right of its header for such a key's rows."""
    cfg = _managed(tmp_path)
    proc, url = _serve(cfg)
    try:
        made = _create(url, "--team", "research")
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=made["secret"], max_retries=0)
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            assert e.status_code == 502, e
        finally:
            await client.close()
    finally:
        _term(proc)  # drains and flushes the ledger
    r = _cli("logs", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert row.index(made["id"]) == header.index("key"), r.stdout
    for column, value in (("status", "502"), ("latency_ms", None), ("error_class", "connect_error")):
        at = header.index(column)
        assert row[at - 2 : at] == "  " and row[at] != " ", (column, r.stdout)
        if value is not None:
            assert row[at:].startswith(value), (column, r.stdout)


# -- the web console, signed in with a managed admin key ------------------------------------------


def test_the_console_signed_in_with_a_managed_admin_key(tmp_path: Path) -> None:
    """`edgeroute keys create --role admin`, then the console at /ui/ with that key: every page
    loads without an error, the routing page's notices read as English (it said `No request
    in this range was routed by a experiment variant.`), and the spend page's rate-limit
    headroom shows a key's requests in flight against its `max_parallel` (it had no column
    for it)."""
    from tests.ui.conftest import need_browser

    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.ui.browser import console_errors, navigate, start_browser, wait_idle

    proc, url = _serve(_managed(tmp_path))
    drv = None
    try:
        admin = _create(url, "--role", "admin", "--name", "console")
        capped = _create(url, "--max-parallel", "3", "--name", "capped")
        drv = start_browser()
        drv.get(url + "/ui/")
        WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.ID, "key"))
        drv.find_element(By.ID, "key").send_keys(admin["secret"])
        drv.find_element(By.ID, "signin").click()
        WebDriverWait(drv, 10).until(lambda d: d.find_element(By.ID, "nav").is_displayed())
        for page in ("overview", "deployments", "routing", "spend", "requests", "alerts", "config"):
            navigate(drv, functools.partial(drv.get, f"{url}/ui/#/{page}"))
            wait_idle(drv)
            assert console_errors(drv) == [], page
            assert [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".notice.error")] == [], page
            if page == "routing":
                notices = [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".notice")]
                assert "No request in this range was routed by an experiment variant." in notices, notices
                assert "No request in this range was routed by a rule." in notices, notices
                assert not [n for n in notices if " a experiment" in n or " a a" in n], notices
            if page == "spend":
                WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.rate-limit"))
                table = drv.find_element(By.XPATH, "//table[caption='Rate-limit headroom']")
                heads = [th.text for th in table.find_elements(By.TAG_NAME, "th")]
                assert heads[-1] == "In flight", heads
                row = next(r for r in table.find_elements(By.CSS_SELECTOR, "tr.rate-limit") if capped["id"] in r.text)
                assert row.find_elements(By.TAG_NAME, "td")[-1].text.startswith("0 / 3"), row.text
        assert admin["secret"] not in drv.current_url
    finally:
        if drv is not None:
            drv.quit()
        _term(proc)


# -- edgeroute keys list ----------------------------------------------------------------------------


def test_keys_list_shows_the_name_a_key_was_given(tmp_path: Path) -> None:
    """`keys create --name` ("a label for people") was kept but `keys list` had no name column,
    so the list of ids did not say which key was whose; its lines ended in padding."""
    proc, url = _serve(_managed(tmp_path))
    try:
        made = _create(url, "--name", "billing-batch", "--team", "research")
        r = _cli("keys", "list", env=_admin_env(url))
    finally:
        _term(proc)
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:3] == ["id", "name", "source"], header
    row = next(x for x in rows if x.startswith(made["id"]))
    assert row.index("billing-batch") == header.index("name"), r.stdout
    assert row.split()[1:4] == ["billing-batch", "managed", "active"], row
    root = next(x for x in rows if x.startswith("root"))
    assert root.split()[1:3] == ["-", "config"], root
    assert all(line == line.rstrip() for line in r.stdout.splitlines()), r.stdout


def test_a_refused_key_field_is_said_once(tmp_path: Path) -> None:
    """`keys update ID --rpm 0` said `error: 400: Invalid key fields: rpm: Input should be greater
    than or equal to 1` and then the same words again on a line of their own."""
    proc, url = _serve(_managed(tmp_path))
    try:
        made = _create(url, "--rpm", "60")
        r = _cli("keys", "update", made["id"], "--rpm", "0", env=_admin_env(url))
    finally:
        _term(proc)
    assert r.returncode == 1, r.stdout
    assert r.stderr.strip() == "error: 400: Invalid key fields: rpm: Input should be greater than or equal to 1", (
        r.stderr
    )


def test_keys_rotate_says_its_new_secret_is_shown_once(tmp_path: Path) -> None:
    """`keys create` says its secret is shown once; `keys rotate --grace 1h`, which prints the
    new secret the same way, said nothing of it."""
    proc, url = _serve(_managed(tmp_path))
    try:
        made = _create(url, "--name", "rotated")
        r = _cli("keys", "rotate", made["id"], "--grace", "1h", env=_admin_env(url))
    finally:
        _term(proc)
    assert r.returncode == 0, r.stderr
    rotated = json.loads(r.stdout)
    assert rotated["secret"].startswith(f"er-{made['id']}.") and rotated["secret"] != made["secret"]
    assert "The new secret above is shown once; store it now." in r.stderr, r.stderr


# -- edgeroute check: the request log's content settings ------------------------------------------------


def test_check_notes_content_settings_that_name_nothing(tmp_path: Path) -> None:
    """The README's `content_models: {support-bot: redacted}` and `content_keys: {auditor: full}`
    pasted into a config without that model or key: `check` said OK and nothing else, and a
    misspelt model or key name keeps that model's prompts as `log_content` says, silently."""
    cfg = _write(
        tmp_path,
        ONE_MODEL
        + "keys:\n  app: {token: app-token-1}\n"
        + "request_log:\n  log_content: none\n"
        + "  content_models: {support-bot: redacted, m: full}\n"
        + "  content_keys: {auditor: full, app: redacted, k0123456789ab: full}\n",
    )
    r = _cli("check", str(cfg))
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: request_log")]
    assert notes == [
        "note: request_log.content_models names support-bot, which is not a model of this config: "
        "its setting applies to no request",
        "note: request_log.content_keys names auditor, which is not a key of this config (nor a managed "
        "key's id, k and 12 hex digits): its setting applies to no request",
    ], r.stderr
    # Names the config has (and a managed key's id) are not noted.
    fine = _write(
        tmp_path, ONE_MODEL + "request_log: {content_models: {m: full}, content_keys: {k0123456789ab: full}}\n"
    )
    r = _cli("check", str(fine))
    assert r.returncode == 0 and "request_log" not in r.stderr, r.stderr


# -- POST /admin/alerts/test to a webhook the operator runs ---------------------------------------------


async def test_a_test_alert_reaches_a_local_webhook_as_the_readme_says(tmp_path: Path) -> None:
    """The README gave the webhook body as `"event": firing|resolved`; the test message a
    webhook's owner checks their set-up with came as `"event": "test"`, which it did not name."""
    from aiohttp import web

    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await got.put(await request.json())
        return web.json_response({"ok": True})

    receiver = await start_routes(web.post("/edgeroute", hook))
    port = receiver.port
    cfg = _write(
        tmp_path,
        ONE_MODEL
        + f"keys:\n  root: {{token: {ROOT}, role: admin}}\n"
        + f"alerts:\n  webhooks:\n    ops: {{url: http://127.0.0.1:{port}/edgeroute}}\n",
    )
    proc, url = await asyncio.to_thread(_serve, cfg)
    try:
        status, body = await call("POST", url + "/admin/alerts/test?webhook=ops", ROOT)
        assert (status, body) == (200, {"queued": ["ops"]}), body
        sent = await asyncio.wait_for(got.get(), 30)
    finally:
        await asyncio.to_thread(_term, proc)
        await receiver.close()
    assert sent["source"] == "edgeroute" and sent["event"] == "test", sent
    assert (sent["alert"]["rule"], sent["alert"]["kind"]) == ("test", "test"), sent
    readme = await asyncio.to_thread(manual_text)
    assert '(`"event": "test"`, its alert\'s `rule` and `kind` `test`)' in readme


# -- Deploy: a read-only config file (the systemd unit, a :ro mount) ---------------------------------


def test_a_change_the_api_cannot_write_back_is_undone_by_the_next_reload(tmp_path: Path) -> None:
    """The systemd unit (ProtectSystem=strict) and the README's `docker run` keep the config
    read-only: a rollback or deployment change through the API answers `file_updated: false`,
    and the next `systemctl reload` (SIGHUP) or restart applies the file again, undoing it. The
    README said only that the change is written back."""
    import re
    import shutil
    import signal
    import urllib.request

    import pytest

    from tests.test_operator_walk2 import _READ_ONLY_ETC, _stop

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"no user and mount namespaces here: {probe.stderr.decode()[:200]}")
    etc, data = tmp_path / "etc", tmp_path / "data"
    etc.mkdir()
    data.mkdir()
    (etc / "edgeroute.yaml").write_text(
        ONE_MODEL + f"keys:\n  root: {{token: {ROOT}, role: admin}}\nledger: {{path: {data}/edgeroute-ledger.db}}\n"
    )
    script = tmp_path / "serve.sh"
    script.write_text(_READ_ONLY_ETC.format(etc=etc, python=sys.executable))
    proc = subprocess.Popen(
        ["unshare", "-r", "-m", "sh", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
    )  # fmt: skip

    def admin(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(
            url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {ROOT}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        assert proc.stdout is not None
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+) ", proc.stdout.readline())
        assert m, proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        url = m[1]
        changed = admin("PATCH", "/admin/deployments/d", {"weight": 3})
        assert changed["file_updated"] is False, changed
        assert admin("GET", "/admin/config")["config"]["deployments"]["d"]["weight"] == 3
        proc.send_signal(signal.SIGHUP)  # what `systemctl reload` sends
        deadline = time.monotonic() + 30
        while (running := admin("GET", "/admin/config"))["version"] == changed["version"]:
            assert time.monotonic() < deadline, "the SIGHUP reload was not applied"
            time.sleep(0.1)
        assert running["config"]["deployments"]["d"].get("weight", 1) == 1, running
    finally:
        _stop(proc)
    said = " ".join(manual_text().split())
    assert "the next reload or restart applies the file again" in said


# -- edgeroute check: residency with no deployment in the region --------------------------------------


def test_check_notes_a_residency_region_no_deployment_is_in(tmp_path: Path) -> None:
    """The README's governance example (`residency: {..., teams: {research: eu}, keys: {root:
    eu}}`) in a config with no deployment tagged `region:eu`: `check` said OK, then every request
    of root's was refused 403 (`none is configured`) and `keys create --residency eu` a 400."""
    cfg = _write(
        tmp_path,
        ONE_MODEL
        + f"keys:\n  root: {{token: {ROOT}, role: admin}}\n  app: {{token: app-token-1}}\n"
        + 'governance:\n  residency: {tag_prefix: "region:", teams: {research: eu}, keys: {root: eu, app: us}}\n',
    )
    r = _cli("check", str(cfg))
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "residency" in line]
    assert notes == [
        "note: governance.residency binds key root and team research to region eu, which no deployment is "
        "tagged with (region:eu): their requests are refused (403) until one is",
        "note: governance.residency binds key app to region us, which no deployment is tagged with "
        "(region:us): its requests are refused (403) until one is",
    ], r.stderr
    tagged = cfg.read_text().replace("price: catalogue}", 'price: catalogue, tags: ["region:eu", "region:us"]}')
    r = _cli("check", str(_write(tmp_path, tagged, "tagged.yaml")))
    assert r.returncode == 0 and "residency" not in r.stderr, r.stderr


# -- serve --log-format text: the decision line -----------------------------------------------------------


async def test_the_text_log_s_decision_line_says_when(tmp_path: Path) -> None:
    """With `log_format: text` (the default) and `decision_log: true`, every other line starts
    with its time, but the decision line was its fields alone: which request it was, and not
    when. It is JSON as before, with `ts` as in JSON mode."""
    import datetime as dt

    cfg = _write(tmp_path, ONE_MODEL.replace("http://127.0.0.1:9/v1", _closed_url()) + "server: {decision_log: true}\n")
    proc, url = await asyncio.to_thread(_serve, cfg)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            assert e.status_code == 502, e
            rid = e.response.headers["x-request-id"]
    finally:
        await client.close()
        await asyncio.to_thread(_term, proc)
    assert proc.stderr is not None
    lines = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x.get("request_id") == rid]
    when = dt.datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60, line
    assert (line["status"], line["model"]) == (502, "m"), line


def test_the_console_tells_a_teams_key_why_a_gateway_view_is_not_shown(tmp_path: Path) -> None:
    """A team's admin key (`keys create --role admin --team research`) in the console: the
    alerts page and the configuration's sections said `GET /admin/alerts: not available on this
    server.`, though the server has them; they cover every team, which a team's key may not see."""
    from tests.ui.conftest import need_browser

    need_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.ui.browser import navigate, start_browser, wait_idle

    proc, url = _serve(_managed(tmp_path))
    drv = None
    try:
        team_admin = _create(url, "--role", "admin", "--team", "research")
        drv = start_browser()
        drv.get(url + "/ui/")
        WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.ID, "key"))
        drv.find_element(By.ID, "key").send_keys(team_admin["secret"])
        drv.find_element(By.ID, "signin").click()
        WebDriverWait(drv, 10).until(lambda d: d.find_element(By.ID, "nav").is_displayed())
        said = {}
        for page in ("alerts", "config"):
            navigate(drv, functools.partial(drv.get, f"{url}/ui/#/{page}"))
            wait_idle(drv)
            said[page] = [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".notice")]
    finally:
        if drv is not None:
            drv.quit()
        _term(proc)
    every = "covers every team, so a key of team research may not see it (sign in with a key without a team)."
    assert f"GET /admin/alerts: {every}" in said["alerts"], said
    assert f"GET /admin/audit: {every}" in said["config"], said
    assert not [n for page in said.values() for n in page if "not available on this server" in n], said


def test_audit_names_the_flag_it_cannot_read() -> None:
    """`edgeroute audit --since yesterday` answered `error: 400: 'since' must be ...` (the API's
    parameter, from a server it had to reach first) with status 1; `logs` and `stats` name
    their flag and exit 2 for a value they cannot read."""
    r = _cli("audit", "--since", "yesterday", "--url", _closed_url().removesuffix("/v1"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: --since: 'yesterday' is not epoch seconds or a span such as 15m, 24h, 7d", (
        r.stderr
    )


# -- deployments at runtime: a change that changes nothing -------------------------------------------


def test_an_undrain_of_a_deployment_in_service_changes_nothing(tmp_path: Path) -> None:
    """`POST /admin/deployments/d/undrain` on a deployment that was not drained (or a PATCH to
    the weight it has) answered `undrained`, recorded a new config version identical to the
    running one, an audit entry, and rewrote the operator's config file, its comments gone."""
    import urllib.request

    cfg = _write(tmp_path, "# the operator's notes\n" + ONE_MODEL + f"keys:\n  root: {{token: {ROOT}, role: admin}}\n")
    before = cfg.read_text()
    proc, url = _serve(cfg)

    def admin(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(
            url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {ROOT}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        version = admin("GET", "/admin/config")["version"]
        got = admin("POST", "/admin/deployments/d/undrain")
        assert got == {"deployment": "d", "action": "unchanged", "version": version, "file_updated": False}, got
        got = admin("PATCH", "/admin/deployments/d", {"weight": 1})
        assert got["action"] == "unchanged" and got["version"] == version, got
        assert [v["version"] for v in admin("GET", "/admin/config/versions")["versions"]] == [version]
        assert not [e for e in admin("GET", "/admin/audit")["entries"] if e["action"].startswith("deployment.")]
        assert cfg.read_text() == before
        # A change that changes something is applied, as before.
        got = admin("PATCH", "/admin/deployments/d", {"weight": 2})
        assert (got["action"], got["version"], got["file_updated"]) == ("updated", version + 1, True), got
    finally:
        _term(proc)


def test_logs_says_content_and_follow_go_with_and_without_an_id(tmp_path: Path) -> None:
    """`edgeroute logs --content` (the README: `[--id ID [--content]]`) printed the table without
    any content and said nothing; `--follow --id ID` showed the one request and did not follow."""
    cfg = _write(tmp_path, ONE_MODEL + f"ledger: {{path: {tmp_path}/log.db}}\n")
    r = _cli("logs", "-c", str(cfg), "--content")
    assert (r.returncode, r.stdout) == (2, ""), r.stdout
    assert r.stderr.strip() == "error: --content shows one request's stored prompt and answer: give it with --id ID"
    r = _cli("logs", "-c", str(cfg), "--follow", "--id", "req_1")
    assert (r.returncode, r.stdout) == (2, ""), r.stdout
    assert "--follow prints new requests as they come; --id shows one" in r.stderr, r.stderr
