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
import functools
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
import orjson
from aiohttp import web

from flywheel.config import Settings
from flywheel.metrics.definitions import Metrics, read_metrics_file
from flywheel.metrics.results import from_stats
from flywheel.model.plan import TrackingPlan, load_plan
from flywheel.registry import InForce
from flywheel.web import board
from flywheel.web.live import Feed, Hub
from flywheel.web.users import NAME, ROLES, Session, Throttle, UserError, Users, allows, check_csrf

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "flywheel_session"
LOGIN_COOKIE = "flywheel_login"  # the login form's pre-session CSRF token (double submit)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# same-origin: the browser names this origin on its own POSTs (no-referrer would make it "null"), and tells
# nothing to other sites
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
MIN_PUSH_SECONDS = 0.25  # an open page gets at most 4 updates a second: bursts coalesce
HEARTBEAT_SECONDS = 5.0  # an idle stream says it is alive, with how current its page is; its session is checked
MAX_DAYS = 92
MAX_STREAMS = 5000  # open pages per UI process (each is a connection); more are refused with 503
IDLE_STOP_SECONDS = 300.0  # the consumer stops this long after the last page closed
SQL_PAGE_MIN_SECONDS = 5.0  # a ClickHouse page's queries run at most this often (the sink's inserts come first)
MAX_PASSWORD = 1024  # longer is refused before argon2 sees it
VERIFYING = 4  # password checks at once (argon2id takes 64 MiB each); more wait their turn … or get 429
REPLAY_LIMIT = 100_000  # rejected events per replay from the UI (the command line has no limit)


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
    """The UI's state: users (closed with the app), the login throttle, the feed and the hub. `query` runs SQL
    on ClickHouse."""

    def __init__(self, settings: Settings, metrics: Metrics, users: Users, query: Callable[[str], Awaitable[list]],
                 *, today: Callable[[], datetime] = lambda: datetime.now(UTC), executor: Executor | None = None):
        self.settings = settings
        self.metrics = metrics
        self.definitions: InForce | None = None  # the stored set and its source (set by whoever follows it)
        self.users = users
        self.query = query
        self.today = today
        self.executor = executor
        self.throttle = Throttle()
        self.verifying = asyncio.Semaphore(VERIFYING)
        self.hub = Hub([p.name for p in PAGES])
        self.feed = self._new_feed()
        self.sql_results: dict[str, dict[str, Any]] = {}
        self.sql_dirty: set[str] = set(SQL_PAGES)  # pages whose data ClickHouse has newer than shown
        self.sql_run_at: dict[str, float] = {}
        self._sql_lock = asyncio.Lock()
        self._starting = asyncio.Lock()
        self._replaying = asyncio.Lock()
        self._idle_since: float | None = None
        self._idle_task: asyncio.Task | None = None
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                            autoescape=True, undefined=jinja2.StrictUndefined)

    @functools.cached_property
    def plan(self) -> TrackingPlan:
        """The tracking plan, for the editor's pickers."""
        return load_plan(self.settings.tracking_plan)

    def use(self, definitions: InForce) -> None:
        """Another set of definitions in force: every open page is drawn again with it."""
        self.definitions, self.metrics = definitions, definitions.metrics
        for p in PAGES:
            self.hub.changed(p.name)

    def _new_feed(self) -> Feed:
        feed = Feed(self.settings, self.hub, self.query)
        names = self.settings.topics
        watched = {getattr(names, t): page for page, topics in SQL_PAGES.items() for t in topics}

        async def moved(topics: set[str]) -> None:
            self.sql_dirty |= {watched[t] for t in topics if t in watched}
            await self.refresh_sql_pages()

        feed.on_sink_moved = moved
        return feed

    @property
    def started(self) -> bool:
        return self.feed.running

    async def start(self) -> None:
        """The feed, with the first open page: a UI nobody watches reads nothing (and stops reading
        IDLE_STOP_SECONDS after the last page closed)."""
        async with self._starting:
            if not self.feed.running:
                await self.feed.start()
            if self._idle_task is None:
                self._idle_task = asyncio.create_task(self._stop_when_idle(), name="ui-idle")

    async def _stop_when_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_STOP_SECONDS / 10)
            if self.hub.subscribers():
                self._idle_since = None
                continue
            now = time.monotonic()
            if self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since >= IDLE_STOP_SECONDS:
                async with self._starting:
                    if not self.hub.subscribers() and self.feed.running:
                        log.info("ui: no page open for %.0f s: the feed stops until the next", IDLE_STOP_SECONDS)
                        await self.feed.stop()
                        self.feed = self._new_feed()
                        self.sql_dirty = set(SQL_PAGES)
                self._idle_since = None

    async def close(self) -> None:
        """The app stops: open streams end, the feed stops, the users file closes."""
        self.hub.close()
        if self._idle_task is not None:
            self._idle_task.cancel()
            await asyncio.gather(self._idle_task, return_exceptions=True)
        await self.feed.stop()
        self.users.close()

    async def _users(self, fn, *args):
        """Users is synchronous SQLite: off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- ClickHouse pages ------------------------------------------------------------------------------
    async def refresh_sql_pages(self, *, force: str | None = None) -> None:
        """Re-run the queries of the ClickHouse pages that are open and have newer data (`force`: that page
        now, whether open or not), each at most every SQL_PAGE_MIN_SECONDS — they share ClickHouse with the
        sink (in a worker, its very thread)."""
        async with self._sql_lock:
            now = time.monotonic()
            for page in sorted(self.sql_dirty):
                due = now - self.sql_run_at.get(page, -1e9) >= SQL_PAGE_MIN_SECONDS
                if page == force or (due and self.hub.pages[page].waiters):
                    self.sql_dirty.discard(page)
                    self.sql_run_at[page] = now
                    await self._run_sql_page(page)
                    self.hub.changed(page)

    async def _run_sql_page(self, page: str) -> None:
        try:
            if page == "quality":
                data = {"hours": await self.query(QUALITY_SQL), "reasons": await self.query(REASONS_SQL)}
            elif page == "segments":
                data = {"sizes": await self.query(SEGMENT_SIZES_SQL),
                        "members": await self.query(SEGMENT_MEMBERS_SQL)}
            else:
                data = {"events": await self.query(ALERTS_SQL)}
            self.sql_results[page] = {**data, "error": None}
        except Exception as exc:  # ClickHouse down: the page says so, keeps its last numbers, tries again
            self.sql_dirty.add(page)
            self.sql_results[page] = {**self.sql_results.get(page, {}), "error": f"ClickHouse: {exc}"}

    # ---- page data -------------------------------------------------------------------------------------
    def params(self, page: str, query: Mapping[str, str]) -> tuple:
        """The parameters a page's data depends on, normalized: the key its rendering is shared under."""
        if page == "funnels":
            return (days_param(query),)
        if page == "events":
            return tuple(query.get(k, "")[:200] for k in ("name", "person", "source"))
        return ()

    def render(self, page: str, params: tuple) -> dict[str, Any]:
        feed = self.feed
        if page == "overview":
            return feed.overview()
        if page == "events":
            name, person, source = params
            return {"events": feed.recent.select(name=name, person=person, source=source),
                    "error": feed.kafka_error and f"Kafka: {feed.kafka_error}"}
        if page in SQL_PAGES:
            return self.sql_results.get(page, {"error": "waiting for ClickHouse"})
        if feed.snapshot_at is None:
            return {"error": feed.clickhouse_error and f"waiting for ClickHouse: {feed.clickhouse_error}"
                    or feed.kafka_error and f"waiting for Kafka: {feed.kafka_error}" or "loading"}
        if page == "funnels":
            first, last = board.day_range(params[0], today=self.today().date())
            return {"from": first, "to": last, "funnels": board.funnels(self.metrics, feed.partials, first, last)}
        if page == "retention":
            return {"retention": board.retention(self.metrics, feed.partials)}
        if page == "active":
            return {"days": board.active_users(feed.partials)}
        if page == "experiments":
            return {"experiments": [from_stats(e, board.experiment_rows(feed.partials, e.name))
                                    for e in self.metrics.experiments]}
        raise KeyError(page)

    def alive(self, page: str) -> dict[str, Any]:
        """A heartbeat's news: up to when the page's data is current, and what is wrong if anything."""
        feed = self.feed
        if page in SQL_PAGES:  # current up to the last look at the sink's offsets, unless newer data waits
            current = None if page in self.sql_dirty else feed.watched_at
        else:
            current = feed.polled_at
        return {"asOf": current if not feed.kafka_error else None,
                "error": feed.kafka_error and f"Kafka: {feed.kafka_error}"}


def days_param(params: Mapping[str, str]) -> int:
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


def _is_open(request: web.Request) -> bool:
    """The login form and the static files: the only things a logged-out visitor may reach (by route, not
    by path prefix)."""
    route = request.match_info.route
    return route.handler in (login_form, login) or isinstance(route.resource, web.StaticResource)


@web.middleware
async def _guard(request: web.Request, handler):
    """Security headers on every /ui response; same-origin POSTs; the session (or the login page) for
    everything but the login form and the static files."""
    dash = request.app[KEY]
    if request.method == "POST":
        origin = request.headers.get("Origin")
        if origin and origin.split("://", 1)[-1] != request.host:
            return _with_headers(web.Response(status=403, text="cross-site request refused"))
    if not _is_open(request):
        session = await dash._users(dash.users.session, request.cookies.get(SESSION_COOKIE))
        if session is None:
            if request.path.startswith("/ui/stream/") or request.method != "GET":
                return _with_headers(web.json_response({"error": "not logged in"}, status=401))
            return _with_headers(web.Response(status=303, headers={"Location": "/ui/login"}))
        request[SESSION] = session
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(HEADERS)
        raise
    if isinstance(request.match_info.route.resource, web.StaticResource):
        response.headers.update({k: v for k, v in HEADERS.items() if k != "Cache-Control"})
    else:
        response.headers.update(HEADERS)
    return response


def _with_headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers.update(HEADERS)
    return response


def _cookie(request: web.Request) -> dict[str, Any]:
    dash = request.app[KEY]
    return {"httponly": True, "samesite": "Strict", "secure": request.secure or dash.settings.ui_secure_cookies}


def _page(request: web.Request, template: str, **context) -> web.Response:
    dash = request.app[KEY]
    session = _session_of(request)
    html = dash.templates.get_template(template).render(
        **{"page": None, "current": None, **context}, pages=PAGES, session=session,
        csrf=session.csrf if session else "",
        allows=allows)
    return web.Response(text=html, content_type="text/html")


async def login_form(request: web.Request) -> web.Response:
    token = secrets.token_urlsafe(24)
    response = _page(request, "login.html", login_token=token, error=request.get(ERROR, ""))
    response.set_cookie(LOGIN_COOKIE, token, path="/ui/login", **_cookie(request))
    return response


async def login(request: web.Request) -> web.Response:
    """Every attempt counts against the throttle before the password is checked (attempts in flight too);
    a success gives back the name's count and this one attempt of the address's."""
    dash = request.app[KEY]
    form = await request.post()
    given, expected = str(form.get("login_token", "")), request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        request[ERROR] = "The form expired: log in again."
        return await login_form(request)
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    address = f"addr:{request.remote}"
    pair = f"user:{name[:64]}@{request.remote}"
    wait = dash.throttle.wait(pair, address)
    if wait > 0:
        return await _refused(request, f"Too many failed logins: try again in {wait:.0f} s.", 429)
    dash.throttle.failed(pair, address)
    if not NAME.match(name) or len(password) > MAX_PASSWORD:
        return await _refused(request, "Wrong name or password.", 401)
    if dash.verifying.locked():
        dash.throttle.forgive(pair, address)
        return await _refused(request, "Too many logins at once: try again in a moment.", 429)
    async with dash.verifying:
        user = await dash._users(dash.users.check, name, password)
    if user is None:
        log.info("ui: failed login for %s from %s", name, request.remote)
        return await _refused(request, "Wrong name or password.", 401)
    dash.throttle.succeeded(pair)
    dash.throttle.forgive(address)
    token, _ = await dash._users(dash.users.open_session, user)
    log.info("ui: %s logged in (%s) from %s", user.name, user.role, request.remote)
    response = web.Response(status=303, headers={"Location": "/ui/overview"})
    response.set_cookie(SESSION_COOKIE, token, path="/ui", **_cookie(request))
    response.del_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


async def _refused(request: web.Request, why: str, status: int) -> web.Response:
    request[ERROR] = why
    response = await login_form(request)
    response.set_status(status)
    return response


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
    response = web.Response(status=303, headers={"Location": "/ui/login"})
    response.del_cookie(SESSION_COOKIE, path="/ui")
    return response


async def page(request: web.Request) -> web.Response:
    spec = PAGE_BY_NAME.get(request.match_info["page"])
    if spec is None:
        raise web.HTTPNotFound(text=f"no page {request.match_info['page']!r}")
    _require(request, spec.role)
    dash = request.app[KEY]
    return _page(request, f"{spec.name}.html", page=spec, query=dict(request.query),
                 metrics=dash.metrics, days=days_param(request.query))


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the page's data now, then again after every change (at most every
    MIN_PUSH_SECONDS); when idle, a heartbeat every HEARTBEAT_SECONDS saying how current the page is —
    and the session is checked again then: a logout, an expiry or a removed user ends the stream."""
    dash = request.app[KEY]
    name = request.match_info["page"]
    if name not in PAGE_BY_NAME:
        raise web.HTTPNotFound(text=f"no page {name!r}")
    _require(request, PAGE_BY_NAME[name].role)
    if dash.hub.subscribers() >= MAX_STREAMS:
        raise web.HTTPServiceUnavailable(text=f"{MAX_STREAMS} pages are open on this UI process: run another "
                                              "(flywheel ui)", headers={"Retry-After": "30"})
    await dash.start()
    params = dash.params(name, request.query)
    token = request.cookies.get(SESSION_COOKIE)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no",
                                           **HEADERS})
    wake = dash.hub.subscribe(name)
    try:
        if name in SQL_PAGES and name in dash.sql_dirty:
            await dash.refresh_sql_pages(force=name)
        await response.prepare(request)
        while not dash.hub.closed:
            try:
                await asyncio.wait_for(wake.wait(), HEARTBEAT_SECONDS)
            except TimeoutError:
                if await dash._users(dash.users.session, token) is None:
                    break  # logged out, expired or removed: the page goes to the login page
                await response.write(b"event: alive\ndata: " + orjson.dumps(dash.alive(name)) + b"\n\n")
                continue
            if dash.hub.closed:
                break
            wake.clear()
            try:
                body = dash.hub.encoded(name, params, lambda: dash.render(name, params))
            except Exception as exc:  # a bug in a page: say so on the page, keep the stream
                log.exception("ui: the %s page failed to render", name)
                body = orjson.dumps({"asOf": None, "error": f"this page failed: {type(exc).__name__}: {exc}"})
            await response.write(b"data: " + body + b"\n\n")
            await asyncio.sleep(MIN_PUSH_SECONDS)
    except ConnectionError:  # the page was closed
        pass
    finally:
        dash.hub.unsubscribe(name, wake)
    return response


async def users_page(request: web.Request) -> web.Response:
    _require(request, "admin")
    dash = request.app[KEY]
    return _page(request, "users.html", page=None, current="users", users=await dash._users(dash.users.list),
                 roles=ROLES,
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
    return web.Response(status=303, headers={"Location": "/ui/users"})


async def replay(request: web.Request) -> web.Response:
    """Editor: send the rejected events of the last N hours back through the pipeline (`flywheel dlq replay`;
    each counts once however often it is replayed). One replay at a time; then back to the page (a reload
    does not replay again)."""
    _require(request, "editor")
    dash = request.app[KEY]
    form = await _checked_form(request)
    from flywheel import dlq

    try:
        hours = max(1, min(24 * 7, int(form.get("hours", "24"))))
    except ValueError:
        raise web.HTTPBadRequest(text="hours must be a whole number") from None
    if dash._replaying.locked():
        raise web.HTTPConflict(text="a replay is running: wait for it, then look at the data quality page")
    async with dash._replaying:
        since = datetime.now(UTC) - timedelta(hours=hours)
        rejected = dlq.rejected(await dash.query(dlq.select_sql(since=since, limit=REPLAY_LIMIT)))
        sent = await asyncio.get_running_loop().run_in_executor(None, dlq.replay, dash.settings, rejected)
    log.info("ui: %s replayed %d rejected events of the last %d h", _session_of(request).user.name, sent, hours)
    return web.Response(status=303, headers={"Location": f"/ui/quality?replayed={sent}&hours={hours}"})


# ---- definitions (docs/design.md §13) ---------------------------------------------------------------------
AUDIT_SQL = """
SELECT revision, toString(at), author, via, kind, name, toString(change), comment
FROM flywheel.definition_changes FINAL ORDER BY revision DESC LIMIT 50"""
BACKFILLS_SQL = """
SELECT revision, length(predicates), events, toString(started), toString(finished)
FROM flywheel.definition_backfills FINAL ORDER BY started DESC LIMIT 10"""


async def _rows_or_error(dash: Dashboard, sql: str) -> tuple[list, str]:
    try:
        return await dash.query(sql), ""
    except Exception as exc:  # ClickHouse away: the page says so, the rest of it shows
        return [], f"ClickHouse: {exc}"


def _in_force(dash: Dashboard):
    from flywheel.metrics.store import Change, split

    state = dash.definitions
    if state is None or state.source == "file":  # nothing stored yet: the file, as the workers use it
        return [Change(kind=k, name=n, spec=spec, author="-", via="file", at=0)
                for k, n, spec in split(read_metrics_file(dash.settings.metrics)).values()]
    return list(state.stored.current.values())


async def definitions_page(request: web.Request) -> web.Response:
    """Every definition in force, where they come from, the audit trail and the backfills; editors edit."""
    from flywheel.web import editor

    dash = request.app[KEY]
    state = dash.definitions
    editor_role = allows(_session_of(request).user.role, "editor")
    audit, audit_error = await _rows_or_error(dash, AUDIT_SQL)
    backfills, backfill_error = await _rows_or_error(dash, BACKFILLS_SQL)
    items = [{"kind": c.kind, "name": c.name, "version": c.version, "author": c.author, "via": c.via,
              "at": _iso(c.at) if c.at else "",
              "text": orjson.dumps(c.spec if editor_role else editor.redacted(c.kind, c.spec)).decode(),
              "editable": c.kind in editor.KINDS and editor.editable(c.kind, c.spec)}
             for c in sorted(_in_force(dash), key=lambda c: (c.kind, c.name))]
    return _page(request, "definitions.html", current="definitions", items=items, kinds=editor.KINDS,
                 source=state.describe() if state is not None else "the metrics file",
                 differs=state.file_differs if state is not None else [], metrics_file=str(dash.settings.metrics),
                 audit=audit, backfills=backfills, error=audit_error or backfill_error,
                 saved=request.query.get("saved", ""))


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def _editor_page(request: web.Request, kind: str, values: dict, *, existing: bool, error: str = "",
                       preview: dict | None = None, status: int = 200) -> web.Response:
    from flywheel.web import editor

    dash = request.app[KEY]
    seen_events, _ = await _rows_or_error(dash, editor.EVENTS_SQL)
    seen_properties, _ = await _rows_or_error(dash, editor.PROPERTIES_SQL)
    events, properties = editor.pickers(dash.plan, seen_events, seen_properties)
    named: dict[str, list[str]] = {"funnels": [], "retention": [], "segments": []}  # what an alert may watch
    for c in _in_force(dash):
        if c.kind in named:
            named[c.kind].append(c.name)
        elif c.kind == "settings" and (c.spec or {}).get("churn_risk"):
            named["segments"].append("churn_risk")
    response = _page(request, "definition.html", current="definitions", kind=kind, label=editor.KINDS[kind],
                     values=values, existing=existing, events=events, properties=properties, error=error,
                     preview=preview, steps=range(1, editor.MAX_STEPS + 1),
                     conditions=range(1, editor.MAX_CONDITIONS + 1), units=editor.UNITS,
                     funnels=named["funnels"], retentions=named["retention"], segments=named["segments"],
                     series_kinds=editor.SERIES_KINDS, variations=range(1, editor.MAX_VARIATIONS + 1),
                     experiment_metrics=range(1, editor.MAX_METRICS + 1), metric_kinds=editor.METRIC_KINDS,
                     rule_kinds=editor.RULE_KINDS)
    response.set_status(status)
    return response


async def definition_form(request: web.Request) -> web.Response:
    """Editor: a new definition (/definitions/new/{kind}) or a stored one (/definitions/edit/{kind}/{name})."""
    from flywheel.web import editor

    _require(request, "editor")
    dash = request.app[KEY]
    kind = request.match_info["kind"]
    if kind not in editor.KINDS:
        raise web.HTTPNotFound(text=f"no editor for {kind!r}: {', '.join(editor.KINDS)} (others: flywheel metrics "
                                    "import)")
    name = request.match_info.get("name")
    if name is None:
        defaults = {"window_n": "1", "window_unit": "d", "period": "day" if kind == "retention" else "",
                    "horizon": "7", "mode": "all", "series_kind": "events", "rule_kind": "threshold",
                    "fire_after": "1", "resolve_after": "1", "control": "1", "min_sample": "100"}
        return await _editor_page(request, kind, defaults, existing=False)
    found = next((c for c in _in_force(dash) if c.kind == kind and c.name == name), None)
    if found is None:
        raise web.HTTPNotFound(text=f"no {editor.KINDS[kind]} named {name!r}")
    if not editor.editable(kind, found.spec):
        raise web.HTTPConflict(text=f"{kind}/{name} has parts this form cannot show: edit it with flywheel metrics "
                                    "export / import")
    return await _editor_page(request, kind, editor.form_from_spec(kind, found.spec), existing=True)


async def definition_change(request: web.Request) -> web.Response:
    """Editor: preview a draft over history, save it (a new version, in force on every worker within seconds,
    its history backfilled), or delete it. Every save and deletion is recorded with who and when."""
    from flywheel import registry
    from flywheel.metrics.definitions import MetricsError
    from flywheel.metrics.store import Change, spec_version
    from flywheel.model.clock import wall_ms
    from flywheel.web import editor

    session = _require(request, "editor")
    dash = request.app[KEY]
    kind = request.match_info["kind"]
    if kind not in editor.KINDS:
        raise web.HTTPNotFound(text=f"no editor for {kind!r}")
    form = await _checked_form(request)
    action = form.get("action")
    existing = form.get("existing") == "1"
    loop = asyncio.get_running_loop()
    try:
        stored = await loop.run_in_executor(None, registry.read, dash.settings)
    except registry.StoreUnavailable as exc:
        return await _editor_page(request, kind, form, existing=existing, error=str(exc), status=503)
    current = stored.mapping() if not stored.empty else read_metrics_file(dash.settings.metrics)
    name = str(form.get("name", "")).strip()
    before = next((c.spec for c in stored.current.values() if c.kind == kind and c.name == name), None)
    try:
        if action == "delete":
            if before is None:
                raise editor.FormError(f"no stored {editor.KINDS[kind]} named {name!r}")
            change = Change(kind=kind, name=name, spec=None, before=before, author=session.user.name, via="ui",
                            at=wall_ms(), comment=str(form.get("comment", "")))
        else:
            spec = editor.spec_from_form(kind, form)
            if not existing and before is not None:
                raise editor.FormError(f"a {editor.KINDS[kind]} named {name!r} exists: edit it, or pick another name")
            change = Change(kind=kind, name=name, spec=spec, before=before, version=spec_version(spec),
                            author=session.user.name, via="ui", at=wall_ms(), comment=str(form.get("comment", "")))
        metrics = registry.checked(dash.settings, current, [change], source=f"{kind}/{name}")
    except (editor.FormError, MetricsError) as exc:
        return await _editor_page(request, kind, form, existing=existing, error=str(exc), status=400)
    if action == "preview":
        d = editor.definition(metrics, kind, name)
        now = dash.settings.clock()()
        if kind == "alerts":
            sql, table = editor.alert_preview(d, metrics, now)
        elif kind == "experiments":
            sql, table = editor.experiment_preview(d)
        else:
            sql, table = editor.preview_sql(kind, d, metrics, now), lambda rows: editor.preview_table(kind, d, rows)
        try:
            rows = await dash.query(sql)
        except Exception as exc:
            return await _editor_page(request, kind, form, existing=existing, error=f"ClickHouse: {exc}",
                                      status=503)
        return await _editor_page(request, kind, form, existing=existing, preview=table(rows))
    if action not in ("save", "delete"):
        raise web.HTTPBadRequest(text=f"unknown action {action!r}")
    if stored.empty:  # nothing stored yet (no worker started): the file goes in first, then the change
        changes = registry.file_changes(dash.settings, author=session.user.name,
                                        comment=f"stored before the first edit: {dash.settings.metrics}")
    else:
        changes = []
    revision = await loop.run_in_executor(None, registry.write, dash.settings, [*changes, change])
    log.info("ui: %s %s %s/%s (revision %d)", session.user.name, "deleted" if change.spec is None else "saved",
             kind, name, revision)
    return web.Response(status=303, headers={"Location": f"/ui/definitions?saved={kind}/{name}@{revision}"})


async def root(request: web.Request) -> web.Response:
    return web.Response(status=303, headers={"Location": "/ui/overview"})


def add_ui(app: web.Application, dashboard: Dashboard) -> None:
    """Mount the UI under /ui on `app` (the admin listener's, or `flywheel ui`'s own). Its feed starts with
    the first open page; at the app's shutdown open streams end, and the feed and the users file close."""
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
    ui.router.add_get("/definitions", definitions_page)
    ui.router.add_get("/definitions/new/{kind}", definition_form)
    ui.router.add_get("/definitions/edit/{kind}/{name}", definition_form)
    ui.router.add_post("/definitions/{kind}", definition_change)
    ui.router.add_get("/stream/{page}", stream, allow_head=False)
    ui.router.add_static("/static/", HERE / "static", follow_symlinks=False)
    ui.router.add_get("/{page}", page)

    async def shutdown(_: web.Application) -> None:
        dashboard.hub.close()  # before aiohttp waits for handlers: streams end now

    async def cleanup(_: web.Application) -> None:
        await dashboard.close()

    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.add_subapp("/ui", ui)


def run_standalone(settings: Settings, *, host: str, port: int) -> None:
    """`flywheel ui`: the UI (and /health) on its own listener, against the same Kafka and ClickHouse as the
    workers — a ClickHouse server directly, embedded ClickHouse through the running worker's /sql."""
    from flywheel import query as queries
    from flywheel.registry import in_force
    from flywheel.runtime.definitions import follow_in
    from flywheel.web.admin import admin_app
    from flywheel.web.health import KafkaProbe
    from flywheel.web.server import Listener, serve

    definitions = in_force(settings, fallback=True)  # Kafka not up yet: the file, then the store once it is

    async def query(sql: str) -> list:
        return (await asyncio.to_thread(queries.run, settings, sql, wait=10.0))[1]

    app = admin_app(role="ui", checks=[KafkaProbe(settings.kafka_bootstrap)])
    dashboard = Dashboard(settings, definitions.metrics, Users(settings.data_dir), query)
    dashboard.use(definitions)
    add_ui(app, dashboard)  # closes the users file at stop

    async def follow(metrics, stored) -> None:
        dashboard.use(InForce(metrics, stored, "stored"))

    follow_in(app, settings, definitions.stored, follow)
    log.info("ui on http://%s:%d/ui (Kafka %s, ClickHouse %s)", host, port, settings.kafka_bootstrap,
             settings.clickhouse_url.split("@")[-1] if settings.clickhouse_url else f"embedded in {settings.data_dir}")
    asyncio.run(serve([Listener(app, host=host, port=port, name="ui")]))
