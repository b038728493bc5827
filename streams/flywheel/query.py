"""`flywheel sql`: run a query on whichever ClickHouse is configured.

Server URL set → straight to the server. Embedded → through the running worker's /sql endpoint when a
worker holds the data directory, else open the directory directly.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import orjson

from flywheel import clickhouse
from flywheel.clickhouse import ClickHouseUnavailable
from flywheel.config import Settings
from flywheel.web.admin import WORKER_FILE


class QueryError(RuntimeError):
    pass


def _running_worker(settings: Settings) -> dict | None:
    try:
        info = orjson.loads((settings.data_dir / WORKER_FILE).read_bytes())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, orjson.JSONDecodeError):
        return None
    return info


def run(settings: Settings, sql: str, *, timeout: float = 300.0) -> tuple[list[str], list[list]]:
    if not settings.clickhouse_url:
        worker = _running_worker(settings)
        if worker is not None:
            return _via_worker(worker, sql, timeout)
    try:
        ch = clickhouse.connect(url=settings.clickhouse_url, data_dir=settings.clickhouse_dir)
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


def _via_worker(worker: dict, sql: str, timeout: float) -> tuple[list[str], list[list]]:
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
        raise QueryError(
            f"the worker (pid {worker['pid']}) holds the embedded ClickHouse but does not answer on port "
            f"{worker['port']}: {exc.reason}"
        ) from exc
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
