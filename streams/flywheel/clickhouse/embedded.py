"""Embedded ClickHouse: chdb, one process per data directory.

chdb locks its data directory, so while a worker runs, `flywheel sql` reaches this engine through the
worker's /sql endpoint (see flywheel.query) instead of opening the directory itself. Opening a directory
another process holds raises ClickHouseBusy, which callers wait out (docs/design.md §7).
"""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import orjson

from flywheel.clickhouse.errors import ClickHouseBusy, ClickHouseUnavailable


def _held_by_another_process(path: Path) -> bool:
    """ClickHouse flocks <path>/status while an engine owns the directory; chdb only reports a
    generic start-up error (the cause goes to stderr), so look at the lock first."""
    status = path / "status"
    if not status.exists():
        return False
    with open(status, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


class EmbeddedClickHouse:
    def __init__(self, data_dir: Path):
        from chdb import session

        self.path = Path(data_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self.label = f"embedded ClickHouse (chdb) at {self.path}"
        busy = ClickHouseBusy(f"{self.path} is held by another process (a worker, or a `flywheel` command "
                              "that opened it): query through `flywheel sql`, which goes through the worker")
        if _held_by_another_process(self.path):
            raise busy
        try:
            self._session = session.Session(str(self.path))
        except Exception as exc:
            if _held_by_another_process(self.path):  # taken between the look and the open
                raise busy from exc
            raise ClickHouseUnavailable(
                f"could not open {self.label}: {exc} (chdb prints the cause on stderr)"
            ) from exc
        # One engine, many threads (sink executor, /sql requests): chdb sessions are not re-entrant.
        self._lock = threading.Lock()

    def _query(self, sql: str, fmt: str = "CSV"):
        with self._lock:
            return self._session.query(sql, fmt)

    def command(self, sql: str) -> None:
        self._query(sql)

    def rows(self, sql: str) -> tuple[list[str], list[tuple]]:
        result = self._query(sql, "JSONCompact")
        data = result.bytes()
        if not data:
            return [], []
        doc = orjson.loads(data)
        names = [c["name"] for c in doc.get("meta", [])]
        return names, [tuple(r) for r in doc.get("data", [])]

    def insert(self, table: str, rows: list[dict]) -> None:
        if rows:
            self.insert_lines(table, json_lines(rows))

    def insert_lines(self, table: str, lines: bytes) -> None:
        """Rows as `json_lines` wrote them (also a store's workers: clickhouse/store.py)."""
        sql = f"INSERT INTO {table} SETTINGS date_time_input_format = 'best_effort' FORMAT JSONEachRow\n"
        self._query(sql + lines.decode())

    def close(self) -> None:
        with self._lock:
            self._session.close()


def json_lines(rows: list[dict]) -> bytes:
    return b"\n".join(_json(r) for r in rows)


def _json(row: dict) -> bytes:
    """A JSONEachRow line. orjson stops at 64-bit integers; a larger one (an experiment's sums, Int256) goes as
    decimal text, which ClickHouse reads into an integer column."""
    try:
        return orjson.dumps(row, option=orjson.OPT_UTC_Z)
    except TypeError:
        return orjson.dumps({k: str(v) if isinstance(v, int) and not -2**63 <= v < 2**64 else v
                             for k, v in row.items()}, option=orjson.OPT_UTC_Z)
