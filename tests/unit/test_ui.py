"""web/ui.py over HTTP (aiohttp's test server): access, sessions, CSRF, roles, headers, escaping. The pages'
data and the browser are tested on a real pipeline in tests/integration/test_ui_browser.py."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from flywheel.config import Settings
from flywheel.metrics.definitions import parse_metrics
from flywheel.web.admin import admin_app
from flywheel.web.ui import CSP, Dashboard, add_ui
from flywheel.web.users import Users

PASSWORD = "correct horse battery"


class Harness:
    def __init__(self, data_dir: Path):
        self.loop = asyncio.new_event_loop()
        self.users = Users(data_dir)
        for name, role in (("vera", "viewer"), ("ed", "editor"), ("ada", "admin")):
            self.users.add(name, role, PASSWORD)
        self.queries: list[str] = []

        async def query(sql: str) -> list:
            self.queries.append(sql)
            return []

        self.dashboard = Dashboard(Settings(data_dir=data_dir), parse_metrics({}), self.users, query)
        app = admin_app(role="test", checks=[])
        add_ui(app, self.dashboard)
        async def start() -> TestClient:
            client = TestClient(TestServer(app))
            await client.start_server()
            return client

        self.client = self.run(start())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def request(self, method: str, path: str, **kwargs) -> tuple[int, dict, str]:
        async def go():
            r = await self.client.request(method, path, allow_redirects=False, **kwargs)
            return r.status, dict(r.headers), await r.text()

        return self.run(go())

    def login(self, name: str, password: str = PASSWORD) -> tuple[int, dict, str]:
        self.client.session.cookie_jar.clear()
        _, _, form = self.request("GET", "/ui/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)
        return self.request("POST", "/ui/login", data={"login_token": token, "name": name, "password": password})

    def csrf(self, path: str = "/ui/overview") -> str:
        _, _, html = self.request("GET", path)
        return re.search(r'name="csrf" value="([^"]+)"', html).group(1)

    def close(self):
        self.run(self.client.close())
        self.users.close()
        self.loop.close()


@pytest.fixture()
def ui(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_a_logged_out_visitor_sees_nothing_but_the_login_page(ui):
    for page in ("/ui/overview", "/ui/funnels", "/ui/events", "/ui/users", "/ui"):
        status, headers, body = ui.request("GET", page)
        assert status == 303 and headers["Location"] == "/ui/login", page
        assert headers["Content-Security-Policy"] == CSP
    status, headers, body = ui.request("GET", "/ui/stream/funnels")
    assert status == 401 and "data:" not in body
    assert ui.request("POST", "/ui/quality/replay", data={"hours": "1"})[0] == 401
    assert ui.dashboard.started is False  # nothing read from Kafka or ClickHouse for a stranger
    status, headers, body = ui.request("GET", "/ui/login")
    assert status == 200 and headers["Content-Security-Policy"] == CSP
    assert "<script" not in body  # the login page runs no script at all


def test_every_page_forbids_inline_script_and_framing(ui):
    ui.login("vera")
    status, headers, body = ui.request("GET", "/ui/funnels")
    assert status == 200
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", body, re.S)
    assert scripts and all('src="/ui/static/' in attrs and not inline.strip() for attrs, inline in scripts)
    assert not re.search(r"\son[a-z]+=", body)  # no inline event handlers either


def test_login_needs_the_form_token_then_sets_a_strict_http_only_cookie(ui):
    status, _, body = ui.request("POST", "/ui/login", data={"name": "vera", "password": PASSWORD})
    assert status == 200 and "The form expired" in body  # no pre-session token: a cross-site login attempt
    status, headers, _ = ui.login("vera")
    assert status == 303 and headers["Location"] == "/ui/overview"
    cookie = headers["Set-Cookie"]
    assert "flywheel_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, _, body = ui.request("GET", "/ui/overview")
    assert status == 200 and "vera (viewer)" in body


def test_wrong_passwords_are_refused_then_throttled(ui):
    for _ in range(5):
        status, _, body = ui.login("vera", "wrong password!")
        assert status == 401 and "Wrong name or password" in body
    status, _, body = ui.login("vera")  # even the right password waits now
    assert status == 429 and "try again in" in body


def test_a_viewer_cannot_reach_editor_or_admin_actions(ui):
    ui.login("vera")
    _, _, quality = ui.request("GET", "/ui/quality")
    assert 'action="/ui/quality/replay"' not in quality
    assert 'href="/ui/users"' not in quality
    csrf = ui.csrf()
    status, _, body = ui.request("POST", "/ui/quality/replay", data={"csrf": csrf, "hours": "1"})
    assert status == 403 and "needs the editor role" in body
    assert ui.request("GET", "/ui/users")[0] == 403
    status, _, _ = ui.request("POST", "/ui/users", data={"csrf": csrf, "action": "add", "name": "mallory",
                                                        "role": "admin", "password": "x" * 12})
    assert status == 403
    assert [u.name for u in ui.users.list()] == ["ada", "ed", "vera"]
    assert not any("invalid_events" in q for q in ui.queries)  # the replay never ran


def test_an_editor_sees_the_replay_form_and_it_needs_the_csrf_token(ui):
    ui.login("ed")
    _, _, quality = ui.request("GET", "/ui/quality")
    assert 'action="/ui/quality/replay"' in quality
    status, _, body = ui.request("POST", "/ui/quality/replay", data={"hours": "1"})
    assert status == 403 and "CSRF" in body
    assert ui.request("GET", "/ui/users")[0] == 403


def test_an_admin_manages_users_with_the_csrf_token(ui):
    ui.login("ada")
    assert ui.request("POST", "/ui/users", data={"action": "add", "name": "bob", "role": "viewer",
                                                  "password": "y" * 12})[0] == 403
    csrf = ui.csrf("/ui/users")
    status, headers, _ = ui.request("POST", "/ui/users", data={"csrf": csrf, "action": "add", "name": "bob",
                                                                "role": "viewer", "password": "y" * 12})
    assert status == 303
    status, _, body = ui.request("POST", "/ui/users", data={"csrf": csrf, "action": "add", "name": "b<o>b",
                                                             "role": "viewer", "password": "y" * 12})
    assert status == 400 and "b&lt;o&gt;b" in body and "b<o>b" not in body
    ui.request("POST", "/ui/users", data={"csrf": csrf, "action": "set-role", "name": "bob", "role": "editor"})
    assert {u.name: u.role for u in ui.users.list()}["bob"] == "editor"
    status, _, body = ui.request("POST", "/ui/users", data={"csrf": csrf, "action": "remove", "name": "ada"})
    assert status == 400 and "cannot remove yourself" in body


def test_logout_needs_the_csrf_token_and_ends_the_session(ui):
    ui.login("vera")
    assert ui.request("POST", "/ui/logout", data={})[0] == 403
    csrf = ui.csrf()
    assert ui.request("POST", "/ui/logout", data={"csrf": csrf})[0] == 303
    assert ui.request("GET", "/ui/overview")[0] == 303  # back to the login page


def test_what_a_page_echoes_is_escaped(ui):
    ui.login("vera")
    status, _, body = ui.request("GET", '/ui/events', params={"name": '"><script>alert(1)</script>'})
    assert status == 200
    assert "<script>alert(1)" not in body and "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in body


def test_a_write_key_opens_nothing(ui):
    import base64

    from flywheel.config import DEV_WRITE_KEY

    for auth in (f"Bearer {DEV_WRITE_KEY}", "Basic " + base64.b64encode(f"{DEV_WRITE_KEY}:".encode()).decode()):
        status, headers, _ = ui.request("GET", "/ui/overview", headers={"Authorization": auth})
        assert status == 303 and headers["Location"] == "/ui/login"
    assert ui.request("GET", "/ui/stream/events", headers={"Authorization": f"Bearer {DEV_WRITE_KEY}"})[0] == 401


def test_echarts_is_served_from_the_package_with_its_licence(ui):
    status, headers, body = ui.request("GET", "/ui/static/echarts/echarts.min.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
    assert "Licensed to the Apache Software Foundation" in body[:400]
    assert '.version="6.1.0"' in body  # the pinned release (static/echarts/README)
    for name in ("LICENSE", "NOTICE", "README"):
        assert ui.request("GET", f"/ui/static/echarts/{name}")[0] == 200
    from yarl import URL

    status, _, body = ui.request("GET", URL("/ui/static/%2E%2E/users.py", encoded=True))
    assert status in (303, 403, 404) and "argon2" not in body  # nothing outside static/


def test_logins_in_flight_count_against_the_throttle(ui):
    """Attempts sent at once must not all pass the check before any failure is counted."""
    _, _, form = ui.request("GET", "/ui/login")
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)

    async def burst():
        async def one():
            r = await ui.client.post("/ui/login", data={"login_token": token, "name": "vera",
                                                         "password": "wrong password!"}, allow_redirects=False)
            return r.status

        return await asyncio.gather(*(one() for _ in range(12)))

    statuses = ui.run(burst())
    assert statuses.count(401) <= 5 and statuses.count(429) >= 7, statuses


def test_a_post_from_another_origin_is_refused(ui):
    ui.login("ada")
    csrf = ui.csrf()
    status, _, body = ui.request("POST", "/ui/logout", data={"csrf": csrf},
                                 headers={"Origin": "https://evil.example"})
    assert status == 403 and "cross-site" in body
    assert ui.request("GET", "/ui/overview")[0] == 200  # still logged in


def test_a_page_shares_its_rendering_only_by_the_parameters_it_reads(ui):
    d = ui.dashboard
    assert d.params("quality", {"name": "x" * 5000, "days": "3"}) == ()
    assert d.params("funnels", {"days": "30", "name": "x"}) == (30,)
    assert d.params("funnels", {"days": "100000"}) == (92,)
    assert d.params("events", {"name": "n" * 500, "person": "p"}) == ("n" * 200, "p", "")
    assert ui.request("HEAD", "/ui/stream/overview")[0] in (401, 405)


def test_an_open_stream_ends_when_its_user_is_removed(ui, monkeypatch):
    from flywheel.web import ui as ui_module

    monkeypatch.setattr(ui_module, "HEARTBEAT_SECONDS", 0.2)
    ui.login("vera")

    async def watch():
        async with ui.client.get("/ui/stream/overview") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            ui.users.remove("vera")
            return await asyncio.wait_for(r.read(), 30)  # the server ends the stream

    ui.run(watch())  # returns only because the server ended the stream
    assert ui.dashboard.hub.subscribers() == 0
    ui.run(ui.dashboard.feed.stop())


def test_clickhouse_pages_query_only_while_open_and_when_the_sink_moved(ui):
    d = ui.dashboard
    invalid = d.settings.topics.invalid
    moved = d.feed.on_sink_moved
    ui.queries.clear()
    ui.run(moved({invalid}))
    assert ui.queries == [] and "quality" in d.sql_dirty  # nobody looks: nothing runs, the page is stale
    wake = d.hub.subscribe("quality")
    ui.run(moved(set()))  # the next watch: the open page's queries run (they read invalid_events)
    assert ui.queries and all("invalid_events" in q for q in ui.queries)
    assert "quality" not in d.sql_dirty and d.sql_results["quality"]["error"] is None
    ui.queries.clear()
    ui.run(moved({invalid}))  # moved again within SQL_PAGE_MIN_SECONDS: held back, still marked stale
    assert ui.queries == [] and "quality" in d.sql_dirty
    d.hub.unsubscribe("quality", wake)


def test_definitions_viewers_see_them_editors_edit_them(ui):
    """Everyone sees what is in force and where it comes from; only editors get the forms and may post."""
    ui.login("vera")
    status, _, body = ui.request("GET", "/ui/definitions")
    assert status == 200 and "checkout" in body and 'id="source"' in body
    assert "/ui/definitions/new/" not in body and "/ui/definitions/edit/" not in body
    assert ui.request("GET", "/ui/definitions/new/funnels")[0] == 403
    assert ui.request("GET", "/ui/definitions/edit/funnels/checkout")[0] == 403
    csrf = ui.csrf("/ui/definitions")
    status, _, body = ui.request("POST", "/ui/definitions/funnels", data={"csrf": csrf, "action": "save",
                                                                          "name": "x", "step1_event": "A"})
    assert status == 403 and "editor role" in body
    ui.login("ed")
    status, _, body = ui.request("GET", "/ui/definitions")
    assert "/ui/definitions/new/funnels" in body and "/ui/definitions/edit/funnels/checkout" in body
    status, _, form = ui.request("GET", "/ui/definitions/new/funnels")
    assert status == 200 and '<select name="step1_event"' in form
    assert '<option value="Product Viewed">' in form  # the tracking plan's events are the choices
    assert "<textarea" not in form  # no free-text YAML
    status, _, form = ui.request("GET", "/ui/definitions/edit/funnels/checkout")
    assert status == 200 and '<option value="Order Completed" selected>' in form
    # a form without CSRF token, or from another site, is refused before anything is read
    assert ui.request("POST", "/ui/definitions/funnels", data={"action": "save"})[0] == 403
    status, _, form = ui.request("GET", "/ui/definitions/new/alerts")
    assert status == 200 and '<select name="series_funnel"' in form and '<option value="checkout">' in form
    status, _, form = ui.request("GET", "/ui/definitions/new/experiments")
    assert status == 200 and '<select name="m1_event"' in form
    assert ui.request("GET", "/ui/definitions/new/settings")[0] == 404


def test_the_live_events_page_shows_events_not_backfills_or_markers(tmp_path):
    """events.identified also carries merge and progress markers, switch reports and backfilled events
    (stages/backfill.py): only events are new events."""
    import orjson
    from flywheel.web.live import Feed, Hub

    settings = Settings(data_dir=tmp_path)

    class TP:
        topic, partition = settings.topics.identified, 0

    class Rec:
        def __init__(self, offset: int, value: dict):
            self.offset, self.value, self.key, self.timestamp = offset, orjson.dumps(value), None, 0

    event = {"type": "track", "event": "Buy", "messageId": "m1", "personId": "u1", "timestamp": 0,
             "properties": {}, "source": "web"}
    feed = Feed(settings, Hub(["events"]), None)
    feed.apply({TP(): [Rec(0, event), Rec(1, {"type": "backfill", "revision": 3, "pids": ["x"],
                                              "event": {**event, "personId": "u0"}}),
                       Rec(2, {"type": "switched", "partition": 0, "revision": 3, "new": []}),
                       Rec(3, {"type": "tick", "from": 0, "of": 1, "at": 5})]})
    shown = feed.recent.select(name="", person="", source="")
    assert [(e["type"], e["person"]) for e in shown] == [("track", "u1")]
