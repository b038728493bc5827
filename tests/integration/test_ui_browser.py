"""The UI in a real browser (Debian's chromium + chromedriver, driven by Selenium) on a real pipeline: one
worker (real Kafka, embedded ClickHouse) serving /ui on its admin listener, events sent through its collector.

One stream for every check: the numbers on screen equal the ClickHouse views; an event sent through the
collector moves a number on an open page without a reload; a viewer cannot reach editor actions; a
logged-out visitor sees nothing; an event whose name and properties carry <script> renders as text; an
editor creates a funnel with pickers, previews it, saves it, and sees its backfilled history and new events
counted once.

FLYWHEEL_SCREENSHOTS=<dir> saves a screenshot of every page there (the README's come from this run).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from flywheel import paths
from flywheel.config import DEV_WRITE_KEY
from flywheel.web.users import Users
from helpers import WorkerProcess, committed_through, service_missing, unique_settings, wait_until

pytestmark = pytest.mark.integration

PASSWORD = "a long enough password"
XSS_NAME = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
XSS_PROPS = {"note": "<script>window.__xss=3</script>", "html": "<b onmouseover=alert(1)>bold</b>"}
EXPERIMENT = """
experiments:
  - name: checkout_button
    exposure: {experiment_id: checkout_button}
    variations: {control: 0.5, green: 0.5}
    control: control
    min_sample: 5
    metrics:
      - name: purchased
        conversion: {event: Order Completed, within: 7d}
"""
PAGES = ("overview", "funnels", "retention", "active", "segments", "experiments", "alerts", "quality", "events")


def browser():
    """Headless Chromium through chromedriver; fails (never skips) when they are missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        service_missing("chromium + chromedriver", "install Debian's chromium and chromium-driver "
                        "(`make test` does: scripts/ensure-chromium)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def post(port: int, messages: list[dict]) -> None:
    body = orjson.dumps({"batch": messages})
    auth = base64.b64encode(f"{DEV_WRITE_KEY}:".encode()).decode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/batch", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200


def journeys(now: datetime) -> list[dict]:
    """Persons over the last 5 days: funnel steps (some drop off), returns (retention), exposures."""
    out = []
    for i in range(40):
        user = f"user-{i}"
        first = now - timedelta(days=i % 5, hours=1)
        steps = ["Product Viewed", "Product Added", "Checkout Started", "Order Completed"][: 1 + i % 4]
        variation = "green" if i % 2 else "control"
        out.append({"type": "track", "event": "Experiment Viewed", "userId": user, "timestamp": first.isoformat(),
                    "properties": {"experiment_id": "checkout_button", "variation_id": variation}})
        for k, name in enumerate(steps):
            props = ({"product_id": f"p{i}", "price": 10.0} if name.startswith("Product")
                     else {"order_id": f"o{i}", "revenue": 20.0} if name == "Order Completed" else {})
            out.append({"type": "track", "event": name, "userId": user, "properties": props,
                        "timestamp": (first + timedelta(minutes=k + 1)).isoformat()})
        if i % 3 == 0 and i % 5:  # came back a day later
            out.append({"type": "page", "name": "Home", "userId": user,
                        "timestamp": (first + timedelta(days=1)).isoformat()})
    return out


@pytest.fixture(scope="module")
def site(kafka, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ui")
    metrics = data_dir / "metrics.yaml"
    metrics.write_text((paths.schemas_dir() / "metrics.yaml").read_text() + EXPERIMENT)
    settings = unique_settings(kafka, data_dir, metrics=metrics)
    users = Users(data_dir)
    for name, role in (("vera", "viewer"), ("ed", "editor"), ("ada", "admin")):
        users.add(name, role, PASSWORD)
    users.close()
    worker = WorkerProcess(settings).start()
    driver = browser()
    try:
        now = datetime.now(UTC)
        post(settings.http_port, journeys(now))
        post(settings.http_port, [  # one valid XSS event, one rejected (its reasons name the bad value)
            {"type": "track", "event": XSS_NAME, "userId": "<b>mallory</b>", "properties": XSS_PROPS},
            {"type": "track", "event": "Product Viewed", "anonymousId": "anon-bad",
             "properties": {"price": "<img src=x onerror=alert(4)>"}}])
        for topic in ("funnels", "retention", "active_users", "experiments", "invalid"):
            wait_until(lambda t=topic: committed_through(kafka, settings.app_id, getattr(settings.topics, t)),
                       timeout=180, what=f"the sink to store {topic}")
        yield Site(settings, worker, driver)
    finally:
        driver.quit()
        worker.stop()


class Site:
    def __init__(self, settings, worker: WorkerProcess, driver):
        self.settings = settings
        self.worker = worker
        self.driver = driver
        self.base = f"http://127.0.0.1:{settings.admin_port}/ui"
        self.user: str | None = None

    def login(self, name: str) -> None:
        from selenium.webdriver.common.by import By

        if self.user == name:
            return
        self.driver.delete_all_cookies()
        self.driver.get(f"{self.base}/login")
        self.driver.find_element(By.NAME, "name").send_keys(name)
        self.driver.find_element(By.NAME, "password").send_keys(PASSWORD)
        self.driver.find_element(By.CSS_SELECTOR, "form.login button").click()
        wait_until(lambda: self.driver.current_url.endswith("/ui/overview"), timeout=30, what=f"{name} to log in")
        self.user = name

    def open(self, page: str, query: str = "") -> None:
        self.driver.get(f"{self.base}/{page}{query}")
        wait_until(lambda: int(self.driver.execute_script("return document.body.dataset.updates || 0")) > 0,
                   timeout=60, what=f"the {page} page's first data")
        self.screenshot(page)

    def screenshot(self, page: str) -> None:
        where = os.environ.get("FLYWHEEL_SCREENSHOTS")
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(Path(where) / f"{page}.png"))

    def table(self, selector: str) -> list[list[str]]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(tr => [...tr.cells].map(td => td.textContent))",
            selector)

    def sql(self, query: str) -> list[list]:
        return self.worker.sql(query)

    def converge(self, shown, expected, what: str):
        """Wait until the page shows what the views say (the UI's consumer may be a moment behind the
        sink, or ahead of it); then they must be equal."""
        try:
            wait_until(lambda: shown() == expected(), timeout=60, what=what)
        except AssertionError:
            assert shown() == expected(), what


def hover(driver, selector: str) -> None:
    """Sweep the mouse over a chart until a tooltip shows (drawn in the chart's SVG: more text in it)."""
    from selenium.webdriver.common.action_chains import ActionChains

    chart = driver.find_element("css selector", selector)
    texts = f"return document.querySelectorAll('{selector} svg text').length"
    before = driver.execute_script(texts)
    for dx in range(-chart.size["width"] // 2 + 20, chart.size["width"] // 2 - 20, 40):
        ActionChains(driver).move_to_element_with_offset(chart, dx, chart.size["height"] // 5).perform()
        if driver.execute_script(texts) > before:
            return
    raise AssertionError(f"no tooltip showed over {selector}")


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_numbers_on_screen_equal_the_clickhouse_views(site):
    site.login("vera")
    site.open("funnels", "?days=7")

    def funnel_screen():
        return {(section, int(r[0])): number(r[2]) for section in ("checkout", "shoes_purchase")
                for r in site.table(f"#funnel-{section}-rows tr")}

    def funnel_views():
        rows = site.sql("SELECT funnel, step, sum(persons) FROM flywheel.funnel_daily "
                        "WHERE day BETWEEN today() - 6 AND today() GROUP BY funnel, step")
        out = {(f, int(s)): int(p) for f, s, p in rows}
        steps = {"checkout": 4, "shoes_purchase": 3}  # schemas/metrics.yaml: every step is shown, 0 or not
        return {(f, s): out.get((f, s), 0) for f, n in steps.items() for s in range(1, n + 1)}

    site.converge(funnel_screen, funnel_views, "funnels on screen == funnel_daily")
    assert funnel_screen()[("checkout", 1)] == 40 and funnel_screen()[("checkout", 4)] == 10
    hover(site.driver, "#funnel-checkout-chart")  # a tooltip: the browser log must show no CSP refusal (below)

    site.open("retention")

    def retention_screen():
        out = {}
        for r in site.table("#retention-new_users-rows tr"):
            for n, persons in enumerate(r[2:], start=1):
                if number(persons):
                    out[(r[0], n)] = (number(persons), number(r[1]))
        return out

    def retention_views():
        return {(str(c), int(n)): (int(p), int(s)) for c, n, p, s in site.sql(
            "SELECT toString(cohort_day), period, persons, cohort_size FROM flywheel.retention_daily "
            "WHERE retention = 'new_users'")}

    site.converge(retention_screen, retention_views, "retention on screen == retention_daily")
    assert retention_screen()

    site.open("active")

    def active_screen():
        return [(r[0], number(r[1]), number(r[2]), number(r[3])) for r in site.table("#rows tr")][::-1]

    def active_views():
        return [(d, int(a), int(w), int(m)) for d, a, w, m in site.sql(
            "SELECT toString(day), dau, wau, mau FROM flywheel.active_users_daily ORDER BY day")]

    site.converge(active_screen, active_views, "active users on screen == active_users_daily")
    assert active_screen()

    site.open("experiments")

    def experiment_screen():
        return {(r[0].split(" ")[0], r[1].split(" ")[0]): number(r[2])
                for r in site.table("#experiment-checkout_button tbody tr")}

    def experiment_views():
        return {(m, v): int(n) for v, m, n in site.sql(
            "SELECT variation, metric, n FROM flywheel.experiment_stats WHERE experiment = 'checkout_button' "
            "AND variation != ''")}

    site.converge(experiment_screen, experiment_views, "experiment arms on screen == experiment_stats")
    assert experiment_screen() == {("purchased", "control"): 20, ("purchased", "green"): 20}

    site.open("quality")
    reasons = site.table("#rows tr")
    assert any("price" in r[1] for r in reasons), reasons

    site.open("overview")  # the workers' lag by topic, read from their consumer group
    lag = wait_until(lambda: {r[0]: number(r[1]) for r in site.table("#rows tr")}, timeout=60, what="the lag table")
    assert site.settings.topics.raw in lag and site.driver.find_element("id", "kafka").text == "ok"
    for page in ("overview", "segments", "alerts"):  # they render, with their "as of" time
        site.open(page)
        assert site.driver.find_element("id", "as-of").text.endswith("UTC")


def test_an_event_sent_through_the_collector_moves_an_open_page_without_a_reload(site):
    site.login("vera")
    site.open("funnels", "?days=1")
    site.driver.execute_script("window.__sameDocument = true")
    before = {int(r[0]): number(r[2]) for r in site.table("#funnel-checkout-rows tr")}
    updates = int(site.driver.execute_script("return document.body.dataset.updates"))
    post(site.settings.http_port, [{"type": "track", "event": "Product Viewed", "userId": f"late-{uuid.uuid4()}",
                                     "properties": {"product_id": "p-new"}}])
    wait_until(lambda: {int(r[0]): number(r[2]) for r in site.table("#funnel-checkout-rows tr")}.get(1)
               == before.get(1, 0) + 1, timeout=120, what="step 1 of checkout to move by one on the open page")
    assert site.driver.execute_script("return window.__sameDocument") is True  # no reload happened
    assert int(site.driver.execute_script("return document.body.dataset.updates")) > updates


def test_the_xss_event_renders_as_text(site):
    from selenium.webdriver.common.by import By

    site.login("vera")
    site.open("events")

    def xss_row():
        return next((r for r in site.table("#rows tr") if r[2] == XSS_NAME), None)

    wait_until(xss_row, timeout=60, what="the XSS event on the live-events page")
    row = xss_row()
    assert row[3] == "<b>mallory</b>" and orjson.loads(row[5]) == XSS_PROPS
    assert site.driver.execute_script("return window.__xss") is None  # nothing ran
    assert not site.driver.find_elements(By.CSS_SELECTOR, "#rows script, #rows img, #rows b")
    assert [r for r in site.table("#rows tr") if r[1] == "invalid"]  # the rejected one is listed, as text too
    markup = site.driver.find_element(By.ID, "rows").get_attribute("innerHTML")
    assert "<script" not in markup and "<img" not in markup and "&lt;script&gt;" in markup
    # the filter's echo is escaped too
    site.open("events", "?name=%3Cscript%3Ewindow.__xss%3D5%3C%2Fscript%3E")
    assert site.driver.execute_script("return window.__xss") is None
    assert site.driver.find_element(By.NAME, "name").get_attribute("value") == "<script>window.__xss=5</script>"
    errors = [e for e in site.driver.get_log("browser") if e["level"] == "SEVERE" or "Refused" in e["message"]]
    assert not errors, errors  # and the CSP refused nothing the pages need (tooltips included)


def test_a_viewer_cannot_reach_editor_actions_and_an_editor_can(site):
    from selenium.webdriver.common.by import By

    site.login("vera")
    site.open("quality")
    assert not site.driver.find_elements(By.ID, "replay")
    assert not site.driver.find_elements(By.CSS_SELECTOR, 'a[href="/ui/users"]')
    site.driver.get(f"{site.base}/users")
    assert "needs the admin role" in site.driver.find_element(By.TAG_NAME, "body").text
    site.login("ed")
    site.open("quality")
    assert site.driver.find_element(By.ID, "replay").is_displayed()
    site.login("ada")
    site.driver.get(f"{site.base}/users")
    site.screenshot("users")
    assert {r[0] for r in site.table("tbody tr")} == {"ada", "ed", "vera"}


def test_a_logged_out_visitor_sees_nothing(site):
    from selenium.webdriver.common.by import By

    site.driver.delete_all_cookies()
    site.user = None
    for page in PAGES:
        site.driver.get(f"{site.base}/{page}")
        assert site.driver.current_url == f"{site.base}/login", page
        assert not site.driver.find_elements(By.CSS_SELECTOR, "tbody tr, .chart")
    site.screenshot("login")
    try:
        urllib.request.urlopen(f"{site.base}/stream/funnels", timeout=10)
        raise AssertionError("the stream answered a stranger")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401


def test_an_editor_creates_a_funnel_with_pickers_sees_its_history_then_new_events_once(site):
    """No YAML: pickers for events, a preview over history (the oracle), save; every worker takes it up, its
    history is backfilled (days before it existed), and a new journey counts once. A viewer cannot edit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = site.driver
    site.login("vera")
    driver.get(f"{site.base}/definitions")
    assert not driver.find_elements(By.ID, "new") and not driver.find_elements(By.PARTIAL_LINK_TEXT, "edit")
    driver.get(f"{site.base}/definitions/new/funnels")
    assert "needs the editor role" in driver.find_element(By.TAG_NAME, "body").text

    site.login("ed")
    driver.get(f"{site.base}/definitions/new/funnels")
    assert not driver.find_elements(By.TAG_NAME, "textarea")
    driver.find_element(By.ID, "name").send_keys("view_to_order")
    # a condition no definition had (the experiment's exposure has a property filter): its history is backfilled
    Select(driver.find_element(By.ID, "step1_event")).select_by_visible_text("Experiment Viewed")
    Select(driver.find_element(By.ID, "step2_event")).select_by_visible_text("Order Completed")
    window = driver.find_element(By.ID, "window_n")
    window.clear()
    window.send_keys("6")
    Select(driver.find_element(By.ID, "window_unit")).select_by_visible_text("hours")
    driver.find_element(By.ID, "preview-button").click()
    wait_until(lambda: driver.find_elements(By.ID, "preview"), timeout=60, what="the preview")
    site.screenshot("definition-preview")

    def expected() -> dict[str, list[int]]:
        """Step 1: who saw the experiment, per day; step 2: of them, who ordered — the journeys order within
        minutes of it, so checkout's last step counts them (the live view, not the preview's query)."""
        by_day: dict[str, list[int]] = {}
        for day, persons in site.sql("SELECT toString(toDate(timestamp)) AS d, uniqExact(person_id) FROM "
                                     "flywheel.events_resolved WHERE event = 'Experiment Viewed' AND late = 0 "
                                     "AND d >= toString(today() - 29) GROUP BY d"):
            by_day[day] = [int(persons), 0]
        for day, persons in site.sql("SELECT toString(day), persons FROM flywheel.funnel_daily WHERE funnel = "
                                     "'checkout' AND step = 4 AND day >= today() - 29"):
            by_day.setdefault(day, [0, 0])[1] = int(persons)
        return by_day

    preview = {r[0]: [number(x) for x in r[1:]] for r in site.table("#preview tbody tr")}
    assert preview == expected() and sum(v[1] for v in preview.values()) >= 10, preview
    driver.find_element(By.ID, "comment").send_keys("from the growth review")
    driver.find_element(By.ID, "save-button").click()
    wait_until(lambda: driver.find_elements(By.ID, "saved"), timeout=60, what="the saved notice")
    rows = {(r[0], r[1]): r for r in site.table("#definitions tbody tr")}
    assert rows[("funnels", "view_to_order")][3].startswith("ed via ui")
    wait_until(lambda: site.sql("SELECT count() FROM flywheel.definition_changes FINAL WHERE name = 'view_to_order'"
                                )[0][0] == 1, timeout=60, what="the audit row")
    audit = site.sql("SELECT author, via, toString(change), comment FROM flywheel.definition_changes FINAL "
                     "WHERE name = 'view_to_order'")
    assert audit == [["ed", "ui", "added", "from the growth review"]]

    # in force without a restart; its history backfilled: every day the journeys had, before it existed
    def on_screen():
        return {int(r[0]): number(r[2]) for r in site.table("#funnel-view_to_order-rows tr")}

    def view(step: int) -> int:
        return int(site.sql(f"SELECT sum(persons) FROM flywheel.funnel_daily WHERE funnel = 'view_to_order' "
                            f"AND step = {step} AND day BETWEEN today() - 6 AND today()")[0][0] or 0)

    totals = {k: sum(v[i] for d, v in preview.items() if d >= str((datetime.now(UTC) - timedelta(days=6)).date()))
              for i, k in enumerate((1, 2))}
    site.open("funnels", "?days=7")
    wait_until(lambda: on_screen() == totals, timeout=120, what="the new funnel's backfilled history on screen")
    site.converge(lambda: {1: view(1), 2: view(2)}, lambda: totals, "funnel_daily of the new funnel")
    assert site.sql("SELECT count() FROM flywheel.definition_backfills")[0][0] >= 1
    site.screenshot("funnels-new")

    # a new journey: one more at each step, on the open page, counted once
    user = f"new-{uuid.uuid4()}"
    now = datetime.now(UTC)
    post(site.settings.http_port, [
        {"type": "track", "event": "Experiment Viewed", "userId": user, "timestamp": now.isoformat(),
         "properties": {"experiment_id": "checkout_button", "variation_id": "green"}},
        {"type": "track", "event": "Order Completed", "userId": user, "properties": {"order_id": "o", "revenue": 1},
         "timestamp": (now + timedelta(seconds=1)).isoformat()}])
    after = {1: totals[1] + 1, 2: totals[2] + 1}
    wait_until(lambda: on_screen() == after, timeout=120, what="the new journey on the open page")
    site.converge(lambda: {1: view(1), 2: view(2)}, lambda: after, "funnel_daily after the new journey")


def test_an_editor_writes_an_alert_rule_and_sees_when_it_would_have_fired(site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = site.driver
    site.login("ed")
    driver.get(f"{site.base}/definitions/new/alerts")
    driver.find_element(By.ID, "name").send_keys("few_orders")
    Select(driver.find_element(By.ID, "series_kind")).select_by_visible_text("events")
    Select(driver.find_element(By.ID, "series_event")).select_by_visible_text("Order Completed")
    Select(driver.find_element(By.ID, "period")).select_by_visible_text("day")
    Select(driver.find_element(By.ID, "rule_kind")).select_by_visible_text("threshold")
    driver.find_element(By.ID, "rule_below").send_keys("1000")  # every day of the journeys has fewer
    driver.find_element(By.ID, "preview-button").click()
    wait_until(lambda: driver.find_elements(By.ID, "preview-summary"), timeout=60, what="the rule's preview")
    transitions = [r[1] for r in site.table("#preview tbody tr")]
    assert transitions[:1] == ["firing"] and "fired 1 times in 7 days" in driver.find_element(
        By.ID, "preview-summary").text, transitions
    site.screenshot("definition-alert")
    driver.find_element(By.ID, "save-button").click()
    wait_until(lambda: driver.find_elements(By.ID, "saved"), timeout=60, what="the saved notice")
    rows = {(r[0], r[1]): r for r in site.table("#definitions tbody tr")}
    assert rows[("alerts", "few_orders")][3].startswith("ed via ui")
    site.login("vera")  # a viewer sees the rule, its webhook (none here) cut to the host, and no edit link
    driver.get(f"{site.base}/definitions")
    assert ("alerts", "few_orders") in {(r[0], r[1]) for r in site.table("#definitions tbody tr")}
    assert not driver.find_elements(By.PARTIAL_LINK_TEXT, "edit")


def test_an_editor_sets_up_an_experiment_previewed_then_live(site):
    """The same exposure and metric as the file's checkout_button, under another name: the preview (the
    oracle's statistics) and then the live arms equal checkout_button's."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = site.driver
    site.login("ed")
    driver.get(f"{site.base}/definitions/new/experiments")
    driver.find_element(By.ID, "name").send_keys("button_again")
    driver.find_element(By.ID, "experiment_id").send_keys("checkout_button")
    for i, (name, share) in enumerate((("control", "0.5"), ("green", "0.5")), start=1):
        driver.find_element(By.ID, f"v{i}_name").send_keys(name)
        driver.find_element(By.ID, f"v{i}_share").send_keys(share)
    driver.find_element(By.ID, "control1").click()
    driver.find_element(By.ID, "m1_name").send_keys("purchased")
    Select(driver.find_element(By.ID, "m1_kind")).select_by_visible_text("conversion")
    Select(driver.find_element(By.ID, "m1_event")).select_by_visible_text("Order Completed")
    within = driver.find_element(By.ID, "m1_within_n")
    within.send_keys("7")
    Select(driver.find_element(By.ID, "m1_within_unit")).select_by_visible_text("days")
    min_sample = driver.find_element(By.ID, "min_sample")
    min_sample.clear()
    min_sample.send_keys("5")
    driver.find_element(By.ID, "preview-button").click()
    wait_until(lambda: driver.find_elements(By.ID, "preview-text"), timeout=60, what="the experiment's preview")
    arms = {v: int(n) for v, n in site.sql("SELECT variation, n FROM flywheel.experiment_stats WHERE experiment = "
                                            "'checkout_button' AND metric = 'purchased'")}
    text = driver.find_element(By.ID, "preview-text").text
    exposed = re.search(r"exposed ([^;]+);", text).group(1)  # "exposed control 20, green 21; 2 excluded"
    assert {v: int(n) for v, n in (part.rsplit(" ", 1) for part in exposed.split(", "))} == arms, (text, arms)
    driver.find_element(By.ID, "save-button").click()
    wait_until(lambda: driver.find_elements(By.ID, "saved"), timeout=60, what="the saved notice")
    site.converge(lambda: {v: int(n) for v, n in site.sql(
        "SELECT variation, n FROM flywheel.experiment_stats WHERE experiment = 'button_again' AND variation != ''")},
        lambda: arms, "the new experiment's live arms")
