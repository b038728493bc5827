"""The admin listener (FLYWHEEL_ADMIN_HOST:FLYWHEEL_ADMIN_PORT, 127.0.0.1:8089 by default): /health
(/health/live, /health/ready), /metrics, a worker's /status and /experiments/{name}/results, and /sql for
embedded ClickHouse. Never on the public collector port: /sql answers queries.

chdb locks its data directory, so while a worker (or a `flywheel store`) runs, `flywheel sql` sends its
query here. /sql needs the bearer token the process writes to <data_dir>/worker.json (clickhouse/owner.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flywheel.clickhouse import ClickHouse, is_bad_data
from flywheel.metrics.definitions import Metrics
from flywheel.web.health import Check, add_health

log = logging.getLogger(__name__)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])


def admin_app(*, role: str, checks: Sequence[Check], max_body: int = 1024**2) -> web.Application:
    """/health (live, ready: web/health.py) and /metrics; a worker adds /status and, with embedded
    ClickHouse, /sql (`add_sql`); a store /sql and /store/insert, whose bodies are whole batches of rows."""
    app = web.Application(client_max_size=max_body)
    add_health(app, role=role, checks=checks)
    app.router.add_get("/metrics", metrics)
    return app


def add_status(app: web.Application, status: Callable[[], dict[str, Any]]) -> None:
    """GET /status: what `flywheel status` prints (runtime/status.py)."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(status()), content_type="application/json")

    app.router.add_get("/status", handler)


def add_experiments(app: web.Application, *, metrics: Metrics,
                    query: Callable[[str], Awaitable[list]]) -> dict[str, Any]:
    """GET /experiments/{name}/results: `flywheel experiments results NAME --json` (metrics/results.py) from
    the live statistics in ClickHouse (`query` runs SQL there). Returns the experiments by name it serves: a
    worker replaces them when the definitions change."""
    from flywheel.metrics.results import from_stats, stats_sql

    by_name = {e.name: e for e in metrics.experiments}

    async def handler(request: web.Request) -> web.Response:
        experiment = by_name.get(request.match_info["name"])
        if experiment is None:
            return web.json_response({"error": f"no experiment {request.match_info['name']!r} in the definitions; "
                                      f"there are: {sorted(by_name)}"}, status=404)
        try:
            rows = await query(stats_sql(experiment))
        except Exception as exc:  # ClickHouse unreachable: say so, the caller retries
            return web.json_response({"error": f"ClickHouse: {exc}"}, status=503)
        return web.Response(body=orjson.dumps(from_stats(experiment, rows)), content_type="application/json")

    app.router.add_get("/experiments/{name}/results", handler)
    return by_name


def add_sql(app: web.Application, *, ch: ClickHouse, executor: Executor, token: str, port: int) -> None:
    """POST /sql with the token `advertise` wrote to <data_dir>/worker.json."""

    async def sql(request: web.Request) -> web.Response:
        if not _authorized(request, token):
            return web.json_response({"error": "missing or wrong token (see <data_dir>/worker.json)"}, status=401)
        query = (await request.read()).decode("utf-8", "replace")
        try:
            columns, rows = await asyncio.get_running_loop().run_in_executor(executor, ch.rows, query)
        except Exception as exc:  # the query's own error, for the user
            return web.json_response({"error": str(exc)}, status=400)
        body = orjson.dumps({"columns": columns, "rows": rows}, default=str)
        return web.Response(body=body, content_type="application/json")

    async def serving(_: web.Application) -> None:
        log.info("%s serving /sql for %s on port %d", os.getpid(), ch.label, port)

    app.router.add_post("/sql", sql)
    app.on_startup.append(serving)


def add_insert(app: web.Application, *, ch, executor: Executor, token: str) -> None:
    """POST /store/insert?table=T, body: JSONEachRow lines — a `flywheel store`'s workers' inserts
    (clickhouse/store.py). 400 when ClickHouse refuses the rows (its error, with its code: the worker's
    sink bisects and dead-letters them), 503 when it fails otherwise (the worker retries)."""

    async def insert(request: web.Request) -> web.Response:
        if not _authorized(request, token):
            return web.json_response({"error": "missing or wrong token (see <data_dir>/worker.json)"}, status=401)
        table = request.query.get("table", "")
        if not _TABLE.fullmatch(table):
            return web.json_response({"error": f"not a table name: {table[:100]!r}"}, status=400)
        lines = await request.read()
        try:
            await asyncio.get_running_loop().run_in_executor(executor, ch.insert_lines, table, lines)
        except Exception as exc:
            return web.json_response({"error": str(exc)}, status=400 if is_bad_data(exc) else 503)
        return web.Response(status=200)

    app.router.add_post("/store/insert", insert)


def _authorized(request: web.Request, token: str) -> bool:
    given = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return hmac.compare_digest(given.encode(), token.encode())


_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
