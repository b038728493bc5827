"""The worker's HTTP surface (on FLYWHEEL_HTTP_PORT): /health, /metrics, and /sql for embedded ClickHouse.

chdb locks its data directory, so while a worker runs, `flywheel sql` sends its query here. /sql needs
the bearer token the worker writes to <data_dir>/worker.json (mode 0600): only someone who can read
the data directory can query through it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
from concurrent.futures import Executor

import faust
import orjson
from faust.web import View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flywheel.clickhouse import ClickHouse
from flywheel.config import Settings

log = logging.getLogger(__name__)

WORKER_FILE = "worker.json"


def register_routes(app: faust.App, *, settings: Settings, ch: ClickHouse, executor: Executor) -> None:
    token = secrets.token_urlsafe(24)

    @app.page("/health")
    class Health(View):
        async def get(self, request):
            return self.json({"status": "ok", "clickhouse": ch.label})

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request):
            return self.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    if settings.clickhouse_url:
        return  # `flywheel sql` talks to the server directly

    @app.page("/sql")
    class SQL(View):
        async def post(self, request):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return self.json({"error": "missing or wrong token (see <data_dir>/worker.json)"}, status=401)
            sql = (await request.read()).decode("utf-8", "replace")
            loop = asyncio.get_running_loop()
            try:
                columns, rows = await loop.run_in_executor(executor, ch.rows, sql)
            except Exception as exc:  # the query's own error, for the user
                return self.json({"error": str(exc)}, status=400)
            body = orjson.dumps({"columns": columns, "rows": rows}, default=str)
            return self.bytes(body, content_type="application/json")

    @app.task
    async def advertise() -> None:
        path = settings.data_dir / WORKER_FILE
        info = {"pid": os.getpid(), "port": settings.http_port, "token": token}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(info))
        log.info("worker %s serving /sql for %s on port %d", os.getpid(), ch.label, settings.http_port)
