"""`flywheel store`: one process owning the embedded ClickHouse for the workers of one machine
(docs/design.md §14).

chdb is one process per data directory. A single worker can own it (the default); to use every core of a
machine without a ClickHouse server, this process owns it instead and workers started with
FLYWHEEL_CLICKHOUSE_URL=flywheel:///<this data directory> insert and query through its admin listener
(clickhouse/store.py): /store/insert, /sql, /health, /metrics. It applies the migrations at start and
holds no Kafka state: stopping and starting it only pauses the workers' inserts (they retry, acking
nothing meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from flywheel.config import Settings
from flywheel.observability import setup_logging
from flywheel.web.admin import add_insert, add_sql, admin_app
from flywheel.web.server import Listener, serve

log = logging.getLogger(__name__)

MAX_INSERT_BYTES = 1024**3  # one insert's rows (FLYWHEEL_SINK_BATCH_SIZE of them; a row is about a kilobyte)


def run(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_format)
    from flywheel.worker import claim, migrated, open_clickhouse

    if settings.clickhouse_url:
        log.error("FLYWHEEL_CLICKHOUSE_URL is set (%s): the store owns an embedded ClickHouse; unset it for "
                  "the store and give it to the workers", settings.clickhouse_url.split("@")[-1])
        sys.exit(2)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token = claim(settings)
    ch = open_clickhouse(settings)
    code = 0
    try:
        migrated(ch)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")  # chdb calls block

        async def ready() -> str | None:
            try:
                await asyncio.get_running_loop().run_in_executor(executor, ch.rows, "SELECT 1")
            except Exception as exc:
                return f"clickhouse: {exc}"
            return None

        app = admin_app(role="store", checks=[ready], max_body=MAX_INSERT_BYTES)
        add_sql(app, ch=ch, executor=executor, token=token, port=settings.admin_port)
        add_insert(app, ch=ch, executor=executor, token=token)
        def ready() -> None:
            log.info("store ready: workers on this machine use FLYWHEEL_CLICKHOUSE_URL=flywheel://%s",
                     settings.data_dir.resolve())

        asyncio.run(serve([Listener(app, host=settings.admin_host, port=settings.admin_port, name="store")],
                          ready=ready))
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            log.exception("store failed: %s", exc)
            code = 1
    finally:
        ch.close()
    log.info("store stopped")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # chdb's global shutdown at exit may crash (see worker.py)
