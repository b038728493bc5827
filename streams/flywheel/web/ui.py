"""The web UI under /ui on the admin listener, or alone with `flywheel ui` (docs/design.md §12).

Server-rendered pages (Jinja2, autoescaped) with one small script (static/app.js) that opens the page's
Server-Sent Events stream, /ui/stream/<page>, and draws what arrives with ECharts (vendored, static/echarts).
The data of every page comes from `live.Feed`: its own Kafka consumer for the metric cells and the live
events, ClickHouse queries for what only ClickHouse has (data quality, segments, alerts) re-run when the
workers' sink moves on their topics.

Safety: every page carries a Content-Security-Policy without inline script (`CSP`); everything shown is
escaped — by Jinja2 on the server, and by `textContent` in app.js (never innerHTML with data). Sessions are
cookies (HttpOnly, SameSite=Strict, Path=/ui); every POST carries the session's CSRF token, the login form a
pre-session one (double submit). A logged-out request gets the login page (or 401 on a stream) and nothing
else. Roles: viewer sees every page; editor also replays rejected events; admin also manages users.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from flywheel.config import Settings
from flywheel.metrics.definitions import Metrics
from flywheel.metrics.results import from_stats
from flywheel.web import board
from flywheel.web.live import Feed, Hub
from flywheel.web.users import ROLES, Session, Throttle, UserError, Users, allows, check_csrf

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "flywheel_session"
LOGIN_COOKIE = "flywheel_login"  # the login form's pre-session CSRF token (double submit)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
MIN_PUSH_SECONDS = 0.25  # an open page gets at most 4 updates a second: bursts coalesce
HEARTBEAT_SECONDS = 5.0  # an idle stream says it is alive (and the page's "as of" moves on)
MAX_DAYS = 92


@dataclass(frozen=True)
class PageSpec:
    name: str
    title: str
    role: str = "viewer"


PAGES = (PageSpec("overview", "Overview"), PageSpec("funnels", "Funnels"), PageSpec("retention", "Retention"),
         PageSpec("active", "Active users"), PageSpec("segments", "Segments"), PageSpec("experiments", "Experiments"),
         PageSpec("alerts", "Alerts"), PageSpec("quality", "Data quality"), PageSpec("events", "Live events"))
PAGE_BY_NAME = {p.name: p for p in PAGES}
# pages that are ClickHouse queries, re-run when the sink moves on these topics (Topics field names)
SQL_PAGES = {"quality": ("invalid",), "segments": ("segments",), "alerts": ("alerts",)}

# rejected events (once each, whatever the merges: uniqExact of the raw record's origin) per hour and source,
# and per source and reason (an event may have several reasons)
QUALITY_SQL = """
SELECT toString(toStartOfHour(received_at)) AS hour, source, uniqExact(origin)
FROM flywheel.invalid_events WHERE received_at >= now() - INTERVAL 24 HOUR
GROUP BY hour, source ORDER BY hour, source"""
REASONS_SQL = """
SELECT source, reason, uniqExact(origin) AS n
FROM flywheel.invalid_events ARRAY JOIN reasons AS reason WHERE received_at >= now() - INTERVAL 24 HOUR
GROUP BY source, reason ORDER BY n DESC, source, reason LIMIT 100"""
SEGMENT_SIZES_SQL = """
SELECT segment, toString(day), persons, entered, exited FROM flywheel.segment_sizes_daily
WHERE day >= today() - 29 ORDER BY segment, day"""
SEGMENT_MEMBERS_SQL = """
SELECT segment, person_id, toString(since) FROM flywheel.segment_members
ORDER BY segment, since DESC LIMIT 20 BY segment"""
ALERTS_SQL = """
SELECT alert, toString(state), toString(period), toString(decided_at), value, reason, rule
FROM flywheel.alert_events FINAL WHERE superseded = 0 AND decided_at >= now() - INTERVAL 7 DAY
ORDER BY decided_at DESC LIMIT 500"""


class Dashboard:
    """The UI's state: users, the login throttle, the feed and the hub. `query` runs SQL on ClickHouse."""

    def __init__(self, settings: Settings, metrics: Metrics, users: Users, query: Callable[[str], Awaitable[list]],
                 *, today: Callable[[], datetime] = lambda: datetime.now(UTC), executor: Executor | None = None):
        self.settings = settings
        self.metrics = metrics
        self.users = users
        self.query = query
        self.today = today
        self.executor = executor
        self.throttle = Throttle()
        self.hub = Hub([p.name for p in PAGES])
        self.feed = Feed(settings, metrics, self.hub, query)
        names = settings.topics
        self.feed.sql_pages = {page: tuple(getattr(names, t) for t in topics) for page, topics in SQL_PAGES.items()}
        self.feed.on_sql_page = self.refresh_sql_page
        self.sql_results: dict[str, dict[str, Any]] = {}
        self.started = False
        self._starting = asyncio.Lock()
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                            autoescape=True, undefined=jinja2.StrictUndefined)

    async def start(self) -> None:
        """The feed and the ClickHouse pages, with the first open page: a UI nobody watches costs nothing."""
        async with self._starting:
            if self.started:
                return
            self.started = True
            await self.feed.start()
            for name in SQL_PAGES:
                await self.refresh_sql_page(name)
                self.hub.changed(name)

    async def _users(self, fn, *args):
        """Users is synchronous SQLite (and argon2's deliberate cost): off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- ClickHouse pages ------------------------------------------------------------------------------
    async def refresh_sql_page(self, page: str) -> None:
        try:
            if page == "quality":
                data = {"hours": await self.query(QUALITY_SQL), "reasons": await self.query(REASONS_SQL)}
            elif page == "segments":
                data = {"sizes": await self.query(SEGMENT_SIZES_SQL),
                        "members": await self.query(SEGMENT_MEMBERS_SQL)}
            else:
                data = {"events": await self.query(ALERTS_SQL)}
            self.sql_results[page] = {**data, "error": None}
            self.feed.clickhouse_error = None
        except Exception as exc:  # ClickHouse down: the page says so and keeps its last numbers
            self.feed._clickhouse_failed(exc)
            self.sql_results[page] = {**self.sql_results.get(page, {}), "error": f"ClickHouse: {exc}"}

    # ---- page data -------------------------------------------------------------------------------------
    def render(self, page: str, params: dict[str, str]) -> dict[str, Any]:
        feed = self.feed
        if page == "overview":
            return feed.overview()
        if page == "events":
            return {"events": feed.recent.select(name=params.get("name", ""), person=params.get("person", ""),
                                                 source=params.get("source", ""))}
        if page in SQL_PAGES:
            return self.sql_results.get(page, {"error": "waiting for ClickHouse"})
        if feed.snapshot_at is None:
            return {"error": feed.clickhouse_error and f"waiting for ClickHouse: {feed.clickhouse_error}"
                    or "loading"}
        if page == "funnels":
            first, last = board.day_range(days_param(params), today=self.today().date())
            return {"from": first, "to": last, "funnels": board.funnels(self.metrics, feed.partials, first, last)}
        if page == "retention":
            return {"retention": board.retention(self.metrics, feed.partials)}
        if page == "active":
            return {"days": board.active_users(feed.partials)}
        if page == "experiments":
            return {"experiments": [from_stats(e, board.experiment_rows(feed.partials, e.name))
                                    for e in self.metrics.experiments]}
        raise KeyError(page)


def days_param(params: dict[str, str]) -> int:
    try:
        return max(1, min(MAX_DAYS, int(params.get("days", "7"))))
    except ValueError:
        return 7


KEY = web.AppKey("dashboard", Dashboard)
SESSION = web.RequestKey("session", Session)
ERROR = web.RequestKey("error", str)  # what the login or users form says went wrong


# ---- the HTTP side ---------------------------------------------------------------------------------------

def _session_of(request: web.Request) -> Session | None:
    return request.get(SESSION)


@web.middleware
async def _guard(request: web.Request, handler):
    """Security headers on every /ui response; the session (or the login page) for everything else."""
    dash = request.app[KEY]
    open_paths = ("/ui/login", "/ui/static/")
    if not request.path.startswith(open_paths):
        session = await dash._users(dash.users.session, request.cookies.get(SESSION_COOKIE))
        if session is None:
            if request.path.startswith("/ui/stream/") or request.method != "GET":
                response = web.json_response({"error": "not logged in"}, status=401)
            else:
                response = web.HTTPSeeOther("/ui/login")
            response.headers.update(HEADERS)
            return response
        request[SESSION] = session
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(HEADERS)
        raise
    if not request.path.startswith("/ui/static/"):
        response.headers.update(HEADERS)
    else:
        response.headers.update({k: v for k, v in HEADERS.items() if k != "Cache-Control"})
    return response


def _page(request: web.Request, template: str, **context) -> web.Response:
    dash = request.app[KEY]
    session = _session_of(request)
    html = dash.templates.get_template(template).render(
        **{"page": None, **context}, pages=PAGES, session=session, csrf=session.csrf if session else "",
        allows=allows)
    return web.Response(text=html, content_type="text/html")


async def login_form(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(24)
    response = _page(request, "login.html", login_token=token, error=request.get(ERROR, ""))
    response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="Strict", path="/ui/login",
                        secure=request.secure)
    return response


async def login(request: web.Request) -> web.Response:
    dash = request.app[KEY]
    form = await request.post()
    given, expected = str(form.get("login_token", "")), request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        request[ERROR] = "The form expired: log in again."
        return await login_form(request)
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    address = f"addr:{request.remote}"
    wait = dash.throttle.wait(f"name:{name}", address)
    if wait > 0:
        request[ERROR] = f"Too many failed logins: try again in {wait:.0f} s."
        response = await login_form(request)
        response.set_status(429)
        return response
    user = await dash._users(dash.users.check, name, password)
    if user is None:
        dash.throttle.failed(f"name:{name}", address)
        log.info("ui: failed login for %r from %s", name, request.remote)
        request[ERROR] = "Wrong name or password."
        response = await login_form(request)
        response.set_status(401)
        return response
    dash.throttle.succeeded(f"name:{name}")
    token, _ = await dash._users(dash.users.open_session, user)
    log.info("ui: %s logged in (%s) from %s", user.name, user.role, request.remote)
    response = web.HTTPSeeOther("/ui/overview")
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/ui", secure=request.secure)
    response.del_cookie(LOGIN_COOKIE, path="/ui/login")
    raise response


async def _checked_form(request: web.Request) -> dict:
    form = await request.post()
    if not check_csrf(_session_of(request), str(form.get("csrf", ""))):
        raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page and try again")
    return dict(form)


def _require(request: web.Request, role: str) -> Session:
    session = _session_of(request)
    if not allows(session.user.role, role):
        raise web.HTTPForbidden(text=f"this needs the {role} role; you are {session.user.role}")
    return session


async def logout(request: web.Request) -> web.Response:
    dash = request.app[KEY]
    await _checked_form(request)
    await dash._users(dash.users.close_session, request.cookies.get(SESSION_COOKIE))
    response = web.HTTPSeeOther("/ui/login")
    response.del_cookie(SESSION_COOKIE, path="/ui")
    raise response


async def page(request: web.Request) -> web.Response:
    spec = PAGE_BY_NAME.get(request.match_info["page"])
    if spec is None:
        raise web.HTTPNotFound(text=f"no page {request.match_info['page']!r}")
    _require(request, spec.role)
    dash = request.app[KEY]
    return _page(request, f"{spec.name}.html", page=spec, query=dict(request.query),
                 metrics=dash.metrics, days=days_param(dict(request.query)))


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the page's data now, then again after every change (at most every
    MIN_PUSH_SECONDS), and a heartbeat with the time when idle."""
    dash = request.app[KEY]
    name = request.match_info["page"]
    if name not in PAGE_BY_NAME:
        raise web.HTTPNotFound(text=f"no page {name!r}")
    _require(request, PAGE_BY_NAME[name].role)
    params = {k: v for k, v in request.query.items() if k in ("days", "name", "person", "source")}
    key = tuple(sorted(params.items()))
    await dash.start()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **HEADERS})
    wake = dash.hub.subscribe(name)
    try:
        await response.prepare(request)
        while True:
            try:
                await asyncio.wait_for(wake.wait(), HEARTBEAT_SECONDS)
            except TimeoutError:
                await response.write(b"event: alive\ndata: %d\n\n" % int(time.time() * 1000))
                continue
            wake.clear()
            body = dash.hub.encoded(name, key, lambda: dash.render(name, params))
            await response.write(b"data: " + body + b"\n\n")
            await asyncio.sleep(MIN_PUSH_SECONDS)
    except (ConnectionError, asyncio.CancelledError):  # the page was closed
        pass
    finally:
        dash.hub.unsubscribe(name, wake)
    return response


async def users_page(request: web.Request) -> web.Response:
    _require(request, "admin")
    dash = request.app[KEY]
    return _page(request, "users.html", page=None, users=await dash._users(dash.users.list), roles=ROLES,
                 error=request.get(ERROR, ""))


async def users_change(request: web.Request) -> web.Response:
    _require(request, "admin")
    dash = request.app[KEY]
    form = await _checked_form(request)
    action, name = form.get("action"), str(form.get("name", ""))
    try:
        if action == "add":
            await dash._users(dash.users.add, name, str(form.get("role", "viewer")), str(form.get("password", "")))
        elif action == "set-role":
            await dash._users(dash.users.set_role, name, str(form.get("role", "")))
        elif action == "remove":
            if name == _session_of(request).user.name:
                raise UserError("you cannot remove yourself")
            await dash._users(dash.users.remove, name)
        else:
            raise UserError(f"unknown action {action!r}")
    except UserError as exc:
        request[ERROR] = str(exc)
        response = await users_page(request)
        response.set_status(400)
        return response
    log.info("ui: %s did %s on user %s", _session_of(request).user.name, action, name)
    raise web.HTTPSeeOther("/ui/users")


async def replay(request: web.Request) -> web.Response:
    """Editor: send the rejected events of the last N hours back through the pipeline (flywheel dlq replay)."""
    _require(request, "editor")
    dash = request.app[KEY]
    form = await _checked_form(request)
    from flywheel import dlq

    try:
        hours = max(1, min(24 * 7, int(form.get("hours", "24"))))
    except ValueError:
        raise web.HTTPBadRequest(text="hours must be a whole number") from None
    since = datetime.now(UTC) - timedelta(hours=hours)
    rows = await dash.query(dlq.select_sql(since=since))
    rejected = dlq.rejected(rows)
    loop = asyncio.get_running_loop()
    sent = await loop.run_in_executor(None, dlq.replay, dash.settings, rejected)
    log.info("ui: %s replayed %d rejected events of the last %d h", _session_of(request).user.name, sent, hours)
    return _page(request, "replayed.html", page=PAGE_BY_NAME["quality"], sent=sent, hours=hours)


async def root(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui/overview")


def add_ui(app: web.Application, dashboard: Dashboard) -> None:
    """Mount the UI under /ui on `app` (the admin listener's, or `flywheel ui`'s own); its feed starts with
    the first open page and stops with the app."""
    ui = web.Application(middlewares=[_guard])
    ui[KEY] = dashboard
    ui.router.add_get("", root)
    ui.router.add_get("/", root)
    ui.router.add_get("/login", login_form)
    ui.router.add_post("/login", login)
    ui.router.add_post("/logout", logout)
    ui.router.add_get("/users", users_page)
    ui.router.add_post("/users", users_change)
    ui.router.add_post("/quality/replay", replay)
    ui.router.add_get("/stream/{page}", stream)
    ui.router.add_static("/static/", HERE / "static", follow_symlinks=False)
    ui.router.add_get("/{page}", page)

    async def stop(_: web.Application) -> None:
        await dashboard.feed.stop()

    app.on_cleanup.append(stop)
    app.add_subapp("/ui", ui)



def run_standalone(settings: Settings, *, host: str, port: int) -> None:
    """`flywheel ui`: the UI (and /health) on its own listener, against the same Kafka and ClickHouse as the
    workers — a ClickHouse server directly, embedded ClickHouse through the running worker's /sql."""
    from flywheel import query as queries
    from flywheel.metrics.definitions import load_metrics
    from flywheel.web.admin import admin_app
    from flywheel.web.health import KafkaProbe
    from flywheel.web.server import Listener, serve

    metrics = load_metrics(settings.metrics)

    async def query(sql: str) -> list:
        return (await asyncio.to_thread(queries.run, settings, sql, wait=10.0))[1]

    users = Users(settings.data_dir)
    app = admin_app(role="ui", checks=[KafkaProbe(settings.kafka_bootstrap)])
    add_ui(app, Dashboard(settings, metrics, users, query))
    log.info("ui on http://%s:%d/ui (Kafka %s, ClickHouse %s)", host, port, settings.kafka_bootstrap,
             "server" if settings.clickhouse_url else f"embedded in {settings.data_dir}")
    try:
        asyncio.run(serve([Listener(app, host=host, port=port, name="ui")]))
    finally:
        users.close()
