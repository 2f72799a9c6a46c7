"""The console in a real browser (headless Chromium), against a proxy that served known traffic.

Every page loads without a console error (errors, failed loads and CSP violations all land
in the browser's log at SEVERE) and without an error notice; the numbers shown equal the
API's; a request that failed over shows its two attempts; a viewer reaches no admin action
and no key reaches nothing. Screenshots of every page at desktop and phone width go to
build/ui-screenshots/.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from typing import Any

import pytest

from tests.ui.conftest import need_browser
from tests.ui.harness import TEAM, TEAM_TOKENS, TOKENS, Console, Traffic

PAGES = ["overview", "deployments", "routing", "spend", "requests", "alerts", "config"]

# Visible form controls with no accessible name (no label, aria-label or text).
UNLABELLED = """
return [...document.querySelectorAll('input, select, textarea, button')]
  .filter(e => e.offsetParent !== null && !(e.labels && e.labels.length)
          && !e.getAttribute('aria-label') && !e.textContent.trim())
  .map(e => e.outerHTML)
"""

pytestmark = pytest.mark.usefixtures("browser")


@pytest.fixture(autouse=True, scope="module")
def _browser_stack() -> None:
    need_browser()


def _token(role: str) -> str:
    return TOKENS.get(role) or TEAM_TOKENS[role]


def get(console: Console, path: str, role: str = "admin") -> Any:
    req = urllib.request.Request(console.url + path, headers={"Authorization": f"Bearer {_token(role)}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def routes(console: Console, role: str = "admin") -> set[str]:
    return set(get(console, "/ui/session", role)["routes"])


def sign_in(drv: Any, console: Console, role: str | None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not drv.current_url.startswith(console.url + "/ui/"):
        drv.get(console.url + "/ui/#/overview")
    # Signed out, then a fresh load (which ends whatever the previous page was fetching).
    mark = str(time.monotonic_ns())
    drv.execute_script(f"sessionStorage.clear(); location.replace('/ui/?fresh={mark}#/overview')")
    WebDriverWait(drv, 10).until(lambda d: d.execute_script("return location.search") == f"?fresh={mark}")
    WebDriverWait(drv, 10).until(lambda d: d.find_elements(By.ID, "key"))
    if role is None:
        return
    drv.find_element(By.ID, "key").send_keys(_token(role))
    drv.find_element(By.ID, "signin").click()
    WebDriverWait(drv, 10).until(lambda d: d.find_element(By.ID, "nav").is_displayed())


def open_page(drv: Any, console: Console, page: str) -> None:
    from tests.ui.browser import navigate, wait_idle

    url = f"{console.url}/ui/#/{page}"
    if drv.current_url == url:  # already there: no navigation, so no new page to wait for
        wait_idle(drv)
    else:
        navigate(drv, lambda: drv.get(url))


def check_clean(drv: Any, where: str) -> None:
    from selenium.webdriver.common.by import By

    from tests.ui.browser import console_errors

    assert console_errors(drv) == [], f"console errors on {where}"
    bad = [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".notice.error")]
    assert bad == [], f"error notices on {where}"


def field(drv: Any, name: str, scope: Any = None) -> Any:
    from selenium.webdriver.common.by import By

    return (scope or drv).find_element(By.CSS_SELECTOR, f'[data-field="{name}"]')


def value(el: Any) -> float:
    return float(el.get_attribute("data-value"))


def login_error(drv: Any) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return str(WebDriverWait(drv, 10).until(lambda d: d.find_element(By.ID, "login-error")).text)


def test_no_key_reaches_nothing(browser: Any, console: tuple[Console, Traffic]) -> None:
    from selenium.webdriver.common.by import By

    c, _ = console
    sign_in(browser, c, None)
    assert not browser.find_element(By.ID, "nav").is_displayed()
    for page in PAGES:
        browser.get(f"{c.url}/ui/#/{page}")
        assert browser.find_elements(By.ID, "key"), f"#/{page} without a key shows the sign-in form"
        assert not browser.find_elements(By.CSS_SELECTOR, ".kpi, table")
    status = browser.execute_async_script("const done = arguments[0]; fetch('/admin/spend').then(r => done(r.status))")
    assert status == 401
    browser.get_log("browser")  # that deliberate 401 is the only error allowed
    browser.find_element(By.ID, "key").send_keys("not-a-key")
    browser.find_element(By.ID, "signin").click()
    assert "not valid" in login_error(browser)
    sign_in(browser, c, None)  # a key without a console role
    browser.find_element(By.ID, "key").send_keys(TOKENS["service"])
    browser.find_element(By.ID, "signin").click()
    assert "viewer, operator or admin" in login_error(browser)
    check_clean(browser, "the sign-in page")


def test_every_page_loads_clean_at_both_widths(browser: Any, console: tuple[Console, Traffic]) -> None:
    from tests.ui.browser import DESKTOP, PHONE, screenshot, set_width

    c, _ = console
    sign_in(browser, c, "admin")
    check_clean(browser, "sign-in")
    for label, (w, h) in (("desktop", DESKTOP), ("phone", PHONE)):
        set_width(browser, w, h)
        for page in PAGES:
            open_page(browser, c, page)
            check_clean(browser, f"#/{page} at {label} width")
            width = browser.execute_script("return document.documentElement.scrollWidth")
            assert width <= w + 1, f"#/{page} scrolls sideways at {w} px"
            screenshot(browser, f"{page}-{label}")
    set_width(browser, *DESKTOP)


def test_overview_numbers_equal_the_api(browser: Any, console: tuple[Console, Traffic]) -> None:
    c, traffic = console
    sign_in(browser, c, "admin")
    open_page(browser, c, "overview")
    if "GET /admin/stats" in routes(c):
        t = get(c, "/admin/stats?since=1h&group_by=none")["totals"]
        expect = {k: t[k] for k in ("requests", "success_rate", "p50_ms", "p95_ms", "cost_usd", "savings_usd")}
    else:
        t = get(c, "/admin/spend?by=deployment&since=1h")["total"]
        expect = {
            "requests": t["requests"],
            "success_rate": t["ok"] / t["requests"],
            "cost_usd": t["cost_usd"],
            "savings_usd": t["savings_usd"],
        }
    assert expect["requests"] == traffic.ok + traffic.refused
    for k, v in expect.items():
        assert math.isclose(value(field(browser, k)), v, rel_tol=1e-9), k
    assert field(browser, "requests").text == str(expect["requests"])
    assert math.isclose(value(field(browser, "cost_per_hour")), expect["cost_usd"], rel_tol=1e-9)  # range: 1 hour


def test_spend_and_deployments_equal_the_api(browser: Any, console: tuple[Console, Traffic]) -> None:
    from selenium.webdriver.common.by import By

    c, _ = console
    sign_in(browser, c, "admin")
    for by in ("model", "key", "day"):
        open_page(browser, c, f"spend?by={by}")
        report = get(c, f"/admin/spend?by={by}&since=1h")
        shown = {}
        for row in browser.find_elements(By.CSS_SELECTOR, "tr[data-group]"):
            shown[row.get_attribute("data-group")] = value(field(browser, "cost_usd", row))
        assert shown == {str(r[by]) if r[by] is not None else "": r["cost_usd"] for r in report["rows"]}
        assert math.isclose(value(field(browser, "total_cost")), report["total"]["cost_usd"])
    if "GET /admin/budgets" in routes(c):
        budgets = get(c, "/admin/budgets")
        for b in budgets["budgets"]:
            box = browser.find_element(By.CSS_SELECTOR, f'[data-budget="{b["name"]}"]')
            assert math.isclose(value(field(browser, "spent_usd", box)), b["spent_usd"], rel_tol=1e-9)
        assert len(browser.find_elements(By.CSS_SELECTOR, "tr.rate-limit")) == len(budgets["rate_limits"]) > 0
    open_page(browser, c, "deployments")
    live = {d["name"]: d for d in get(c, "/admin/deployments")["deployments"]}
    rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-deployment]")
    assert {r.get_attribute("data-deployment") for r in rows} == set(live)
    for r in rows:
        d = live[r.get_attribute("data-deployment")]
        assert value(field(browser, "requests", r)) == d["requests"]
        assert value(field(browser, "failures", r)) == d["failures"]
        assert field(browser, "circuit", r).text == d["circuit"].replace("_", "-")
    assert live["d-primary"]["failures"] == 2  # the two 503s that failed over


def test_request_detail_shows_the_failover(browser: Any, console: tuple[Console, Traffic]) -> None:
    from selenium.webdriver.common.by import By

    c, traffic = console
    if "GET /admin/requests/{id}" not in routes(c):
        pytest.skip("this server has no request log (GET /admin/requests/{id})")
    sign_in(browser, c, "admin")
    rid = traffic.failed_over[0]
    open_page(browser, c, f"requests/{rid}")
    check_clean(browser, "the request detail")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.attempt")
    got = [(field(browser, "deployment", r).text, field(browser, "kind", r).text) for r in rows]
    assert got == [("d-primary", "first"), ("d-backup", "fallback")]
    assert field(browser, "outcome", rows[0]).text != "ok"
    assert browser.find_elements(By.CSS_SELECTOR, '.chart svg[aria-label^="Attempts of request"]')
    from tests.ui.browser import screenshot

    screenshot(browser, "request-detail-desktop")
    # The list links to it.
    open_page(browser, c, "requests")
    link = browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{rid}"] a')
    from tests.ui.browser import navigate

    navigate(browser, link.click)
    assert field(browser, "id").text == rid


def test_a_link_with_a_bad_escape_still_draws_its_page(browser: Any, console: tuple[Console, Traffic]) -> None:
    """A link whose hash holds a malformed `%` escape: `decodeURIComponent` threw in the router
    and the console stayed on the page before (blank when it was the first one) (huntUI #4)."""
    from selenium.webdriver.common.by import By

    from tests.ui.browser import console_errors, navigate

    c, _ = console
    sign_in(browser, c, "admin")
    navigate(browser, lambda: browser.get(f"{c.url}/ui/#/requests/%E0%A4"), timeout=5)
    assert browser.find_element(By.ID, "page-title").text == "Request %E0%A4"
    # The id as written, asked for (and not found): that 404 is the only error the page logs.
    errors = [e["message"] for e in console_errors(browser)]
    assert all("/admin/requests/%25E0%25A4 " in m and "404" in m for m in errors), errors


def test_alerts_link_to_the_requests_around_them(browser: Any, console: tuple[Console, Traffic]) -> None:
    from selenium.webdriver.common.by import By

    from tests.ui.browser import navigate

    c, traffic = console
    if "GET /admin/alerts" not in routes(c):
        pytest.skip("this server has no alerts (GET /admin/alerts)")
    deadline = time.monotonic() + 15  # alerts are evaluated every second
    while not (firing := get(c, "/admin/alerts")["firing"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [a["rule"] for a in firing] == ["primary-errors"]
    sign_in(browser, c, "viewer")
    open_page(browser, c, "alerts")
    check_clean(browser, "the alerts page")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-alert="{firing[0]["id"]}"]')
    assert field(browser, "rule", row).text == "primary-errors"
    navigate(browser, row.find_element(By.CSS_SELECTOR, "a.around").click)
    assert "deployment=d-primary" in browser.current_url
    shown = {r.get_attribute("data-id") for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-id]")}
    params = browser.current_url.split("#/requests?", 1)[1]
    listed = get(c, f"/admin/requests?{params}&limit=100")["data"]
    assert shown == {r["id"] for r in listed} and len(shown) == (
        traffic.ok - len(traffic.failed_over) - traffic.by_rule - traffic.team
    )


def test_stored_content_is_redacted_and_for_admins_only(browser: Any, console: tuple[Console, Traffic]) -> None:
    from selenium.webdriver.common.by import By

    c, traffic = console
    rid = traffic.with_pii
    assert rid is not None
    if get(c, f"/admin/requests/{rid}").get("content") is None:
        pytest.skip("this server does not store request content (request_log.log_content)")
    sign_in(browser, c, "admin")
    open_page(browser, c, f"requests/{rid}")
    check_clean(browser, "a request with content")
    shown = field(browser, "content-request").text
    assert "[PII:email]" in shown and "alice@example.com" not in shown
    assert "alice@example.com" not in browser.page_source
    sign_in(browser, c, "viewer")
    open_page(browser, c, f"requests/{rid}")
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-field^="content-"]')
    assert "admin keys only" in browser.find_element(By.ID, "main").text


def test_viewer_reaches_no_admin_action(browser: Any, console: tuple[Console, Traffic]) -> None:
    from selenium.webdriver.common.by import By

    c, _ = console
    sign_in(browser, c, "viewer")
    assert "POST /admin/reload" not in routes(c, "viewer")
    for page in PAGES:
        open_page(browser, c, page)
        check_clean(browser, f"#/{page} as a viewer")
        assert not browser.find_elements(By.CSS_SELECTOR, "#reload, button.rollback, button.revoke"), page
    status = browser.execute_async_script(
        "const done = arguments[0], key = sessionStorage.getItem('edgeroute.console.key');"
        "fetch('/admin/reload', {method: 'POST', headers: {Authorization: 'Bearer ' + key}}).then(r => done(r.status))"
    )
    assert status == 403  # and the server refuses it anyway
    browser.get_log("browser")
    sign_in(browser, c, "operator")
    open_page(browser, c, "deployments")
    assert browser.find_elements(By.ID, "reload")


def test_a_team_key_sees_its_teams_budgets_and_stats(browser: Any, console: tuple[Console, Traffic]) -> None:
    """A team's viewer: every page it may open loads without an error (before, its budgets
    were "not available" and the routing and overview sections by deployment, provider, rule
    ... were 403 errors); its budgets, its stats by deployment and its rate limits are its
    team's, as the API gives them to its key, and a budget that counts every team's spend
    shows its limit but not its figures."""
    from selenium.webdriver.common.by import By

    c, traffic = console
    sign_in(browser, c, "team-viewer")
    assert {"GET /admin/budgets", "GET /admin/stats"} <= routes(c, "team-viewer")
    for page in PAGES:
        open_page(browser, c, page)
        check_clean(browser, f"#/{page} as a team's viewer")

    open_page(browser, c, "spend")
    budgets = get(c, "/admin/budgets", "team-viewer")
    assert budgets["team"] == TEAM and field(browser, "budget_team").text.endswith(f"team {TEAM}.")
    mine = next(b for b in budgets["budgets"] if b["name"] == "team-monthly")
    assert mine["match"] == TEAM and mine["spent_usd"] > 0 and not mine["shared"]
    box = browser.find_element(By.CSS_SELECTOR, '[data-budget="team-monthly"]')
    assert math.isclose(value(field(browser, "spent_usd", box)), mine["spent_usd"], rel_tol=1e-9)
    shared = browser.find_element(By.CSS_SELECTOR, '[data-budget="monthly"]')
    assert shared.get_attribute("data-shared") == "true" and value(field(browser, "limit_usd", shared)) == 5.0
    assert not shared.find_elements(By.CSS_SELECTOR, '[data-field="spent_usd"]')
    assert "not shown" in field(browser, "withheld", shared).text
    # Everyone's spend in the global budget, never on the page.
    everyone = next(b for b in get(c, "/admin/budgets")["budgets"] if b["name"] == "monthly")
    assert everyone["spent_usd"] > mine["spent_usd"] and str(everyone["spent_usd"]) not in browser.page_source
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.rate-limit")) == len(budgets["rate_limits"]) > 0

    open_page(browser, c, "routing")
    by_deployment = get(c, "/admin/stats?since=1h&group_by=deployment", "team-viewer")
    assert {r["group"]: r["requests"] for r in by_deployment["rows"]} == {"d-cheap": traffic.team}
    rows = browser.find_elements(By.XPATH, "//table[caption='Requests by Deployment']//tr[@data-group]")
    shown = {r.get_attribute("data-group"): value(field(browser, "requests", r)) for r in rows}
    assert shown == {"d-cheap": traffic.team}


def test_keyboard_and_labels(browser: Any, console: tuple[Console, Traffic]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from tests.ui.browser import navigate, wait_idle

    c, _ = console
    sign_in(browser, c, "admin")
    for page in PAGES:
        open_page(browser, c, page)
        unlabelled = browser.execute_script(UNLABELLED)
        assert unlabelled == [], f"controls without a label on #/{page}"
    open_page(browser, c, "overview")
    browser.refresh()  # a fresh load: keyboard focus starts at the top of the document
    wait_idle(browser)
    ActionChains(browser).send_keys(Keys.TAB).perform()
    active = browser.switch_to.active_element
    assert active.get_attribute("class") == "skip"
    active.send_keys(Keys.ENTER)
    seen = []
    for _ in range(12):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        seen.append(browser.switch_to.active_element.get_attribute("href") or "")
    assert any(s.endswith("#/deployments") for s in seen), "the navigation is reachable by keyboard"
    nav = browser.find_element(By.CSS_SELECTOR, 'a[href="#/alerts"]')
    navigate(browser, lambda: nav.send_keys(Keys.ENTER))
    assert browser.switch_to.active_element.get_attribute("id") == "page-title"  # focus moves to the new page


def test_without_keys_loopback_needs_no_sign_in(browser: Any, tmp_path: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    c = Console(tmp_path, with_keys=False).start()
    try:
        browser.get(c.url + "/ui/#/overview")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "nav").is_displayed())
        assert "loopback" in browser.find_element(By.ID, "who").text
        assert not browser.find_elements(By.ID, "key")
        open_page(browser, c, "overview")
        check_clean(browser, "the keyless overview")
        # A same-origin POST from the console (the browser adds an Origin header): reload.
        open_page(browser, c, "deployments")
        browser.find_element(By.ID, "reload").click()
        browser.switch_to.alert.accept()
        WebDriverWait(browser, 10).until(lambda d: "Reloaded." in d.find_element(By.ID, "main").text)
        check_clean(browser, "a reload without keys")
        session = json.loads(urllib.request.urlopen(c.url + "/ui/session", timeout=10).read())
        if "POST /admin/config/check" in session["routes"]:
            open_page(browser, c, "config")
            browser.find_element(By.ID, "check-text").send_keys("providers: 3")
            browser.find_element(By.ID, "check").click()
            WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".check-errors li"))
            check_clean(browser, "a config check without keys")
    finally:
        c.stop()


def test_config_versions_diff_and_rollback(browser: Any, tmp_path: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    c = Console(tmp_path).start()
    try:
        if "POST /admin/config/rollback" not in routes(c):
            pytest.skip("this server has no config versions (POST /admin/config/rollback)")
        text = c.config_path.read_text()
        c.config_path.write_text(text.replace("limit_usd: 5.0", "limit_usd: 7.0"))
        req = urllib.request.Request(
            c.url + "/admin/reload", method="POST", headers={"Authorization": f"Bearer {TOKENS['admin']}"}
        )
        urllib.request.urlopen(req, timeout=10).read()
        versions = sorted(v["version"] for v in get(c, "/admin/config/versions")["versions"])
        old, new = versions[0], versions[-1]
        sign_in(browser, c, "viewer")
        open_page(browser, c, "config")
        check_clean(browser, "the config page as a viewer")
        assert not browser.find_elements(By.CSS_SELECTOR, "button.rollback")
        sign_in(browser, c, "operator")
        open_page(browser, c, "config")
        Select(browser.find_element(By.ID, "diff-from")).select_by_value(str(old))
        Select(browser.find_element(By.ID, "diff-to")).select_by_value(str(new))
        browser.find_element(By.ID, "show-diff").click()
        diff = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, "pre.diff"))
        assert diff.text.strip() == get(c, f"/admin/config/diff?from={old}&to={new}")["diff"].strip()
        assert "limit_usd: 7.0" in diff.text
        browser.find_element(By.CSS_SELECTOR, f'button.rollback[data-version="{old}"]').click()
        browser.switch_to.alert.accept()
        WebDriverWait(browser, 10).until(lambda d: "at=" in d.current_url)
        open_page(browser, c, "config")
        check_clean(browser, "the config page after a rollback")
        running = get(c, "/admin/config")
        assert "limit_usd: 5.0" in json.dumps(running) or '"limit_usd": 5.0' in json.dumps(running)
    finally:
        c.stop()


def _call(console: Console, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {TOKENS['admin']}", "Content-Type": "application/json"}
    req = urllib.request.Request(console.url + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_managed_keys_by_name_and_a_revoked_keys_budget_marked(browser: Any, tmp_path: Any) -> None:
    """A viewer's console named managed keys by id alone in the request log and the budgets,
    and listed a revoked key's budget as a live one's."""
    import openai
    from selenium.webdriver.common.by import By

    from tests.ui.harness import HELLO

    c = Console(tmp_path, managed_keys=True).start()
    try:
        live = _call(c, "POST", "/admin/keys", {"name": "billing-bot", "budget_usd": 1.0, "rpm": 100})
        gone = _call(c, "POST", "/admin/keys", {"name": "old-bot", "budget_usd": 2.0})
        for k in (live, gone):
            with openai.OpenAI(base_url=c.url + "/v1", api_key=k["secret"], max_retries=0, timeout=20) as client:
                client.chat.completions.create(model="m", messages=HELLO)
        _call(c, "DELETE", f"/admin/keys/{gone['id']}")
        c._wait_written(2)
        sign_in(browser, c, "viewer")
        open_page(browser, c, "spend")
        check_clean(browser, "the budgets of managed keys")
        ended = browser.find_element(By.CSS_SELECTOR, f'[data-budget="key:{gone["id"]}"]')
        assert field(browser, "key_status", ended).text == "revoked" and "old-bot" in ended.text
        assert value(field(browser, "spent_usd", ended)) > 0  # its spend stays listed
        active = browser.find_element(By.CSS_SELECTOR, f'[data-budget="key:{live["id"]}"]')
        assert not active.find_elements(By.CSS_SELECTOR, '[data-field="key_status"]') and "billing-bot" in active.text
        limited = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "tr.rate-limit") if live["id"] in r.text]
        assert len(limited) == 1 and "(billing-bot)" in limited[0]
        open_page(browser, c, f"requests?key={live['id']}")
        check_clean(browser, "the request log of a managed key")
        rows = browser.find_elements(By.CSS_SELECTOR, "tr[data-id]")
        assert len(rows) == 1 and field(browser, "key_name", rows[0]).text == "(billing-bot)"
        open_page(browser, c, "requests/" + rows[0].get_attribute("data-id"))
        assert "billing-bot" in browser.find_element(By.ID, "main").text
    finally:
        c.stop()
