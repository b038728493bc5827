"""`flywheel sql`: run a query on whichever ClickHouse is configured.

Server URL set → straight to the server; a store's URL (flywheel:///dir) → through that store's /sql,
waited for while it starts. Embedded → through the running worker's /sql endpoint when a worker holds the
data directory, else open the directory directly.

Through a restart (docs/design.md §7): a starting worker names itself in <data_dir>/worker.json before it
opens ClickHouse, and its /sql answers before its tables are recovered. So a query waits — saying so
through `on_wait` — while that worker is not answering yet, or while another process holds the directory
for a moment; a read cut by a worker dying is sent again. A write is never sent twice: it may have run.
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import orjson

from flywheel import clickhouse
from flywheel.clickhouse import ClickHouseBusy, ClickHouseUnavailable
from flywheel.clickhouse.owner import running_worker
from flywheel.config import Settings

WAIT_SECONDS = 120.0
_READ = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.IGNORECASE)


class QueryError(RuntimeError):
    pass


class _NotAnswering(Exception):
    """The worker named in worker.json does not answer (yet, or any more): worth waiting for."""


def run(settings: Settings, sql: str, *, timeout: float = 300.0, wait: float = WAIT_SECONDS,
        on_wait: Callable[[str], None] | None = None) -> tuple[list[str], list[list]]:
    """Column names and rows. Waits up to `wait` seconds for a starting worker or a busy directory,
    calling `on_wait(why)` each time it does."""
    deadline = time.monotonic() + wait
    while True:
        # a server URL: straight there; a store's (flywheel:///dir): waited for while it starts
        worker = None if settings.clickhouse_url else running_worker(settings.data_dir)
        try:
            if worker is not None:
                return _via_worker(worker, sql, timeout, retry_cut=bool(_READ.match(sql)))
            return _direct(settings, sql)
        except (_NotAnswering, ClickHouseBusy) as exc:
            why = str(exc)
        if time.monotonic() >= deadline:
            raise QueryError(f"{why}; gave up after {wait:.0f} s")
        if on_wait is not None:
            on_wait(why)
        time.sleep(0.25)


def _direct(settings: Settings, sql: str) -> tuple[list[str], list[list]]:
    try:
        ch = clickhouse.connect(url=settings.clickhouse_url, data_dir=settings.clickhouse_dir)
    except ClickHouseBusy:
        raise
    except ClickHouseUnavailable as exc:
        raise QueryError(str(exc)) from exc
    try:
        columns, rows = ch.rows(sql)
        return columns, [list(r) for r in rows]
    except ClickHouseUnavailable as exc:
        raise QueryError(str(exc)) from exc
    except Exception as exc:
        raise QueryError(str(exc).strip()) from exc
    finally:
        ch.close()


def _via_worker(worker: dict, sql: str, timeout: float, *, retry_cut: bool) -> tuple[list[str], list[list]]:
    request = urllib.request.Request(
        f"http://{worker.get('host', '127.0.0.1')}:{worker['port']}/sql", data=sql.encode(), method="POST",
        headers={"Authorization": f"Bearer {worker['token']}", "Content-Type": "text/plain"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            doc = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = orjson.loads(exc.read()).get("error", str(exc))
        except orjson.JSONDecodeError:
            message = str(exc)
        raise QueryError(message.strip()) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            raise _NotAnswering(f"the worker (pid {worker['pid']}) is starting: waiting for its /sql on port "
                                f"{worker['port']}") from exc
        raise QueryError(f"the worker (pid {worker['pid']}) holds the embedded ClickHouse but does not answer "
                         f"on port {worker['port']}: {exc.reason}") from exc
    except TimeoutError as exc:
        raise QueryError(f"the worker (pid {worker['pid']}) did not answer within {timeout:.0f} s") from exc
    except (ConnectionError, http.client.HTTPException) as exc:  # the worker went away mid-answer
        if retry_cut:
            raise _NotAnswering(f"the worker (pid {worker['pid']}) went away while answering: "
                                "asking again") from exc
        raise QueryError(f"the worker (pid {worker['pid']}) went away while running the statement ({exc}): "
                         "it may or may not have run; check before running it again") from exc
    return doc["columns"], doc["rows"]


def format_table(columns: list[str], rows: list[list], fmt: str) -> str:
    def cell(v) -> str:
        if v is None:
            return "\\N"
        if isinstance(v, list | dict):
            return orjson.dumps(v, default=str).decode()
        return str(v)

    if fmt == "json":
        return "\n".join(orjson.dumps(dict(zip(columns, r, strict=True)), default=str).decode() for r in rows)
    if fmt == "tsv":
        lines = ["\t".join(columns)] if columns else []
        lines += ["\t".join(cell(v) for v in r) for r in rows]
        return "\n".join(lines)
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])
