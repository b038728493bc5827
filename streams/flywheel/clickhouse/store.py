"""The embedded ClickHouse of a `flywheel store` process, for workers on the same machine
(FLYWHEEL_CLICKHOUSE_URL=flywheel:///<the store's data directory>; docs/design.md §14).

chdb is one process per data directory, so without a server every worker would need its own ClickHouse.
Instead one process owns it (flywheel/store.py) and workers send it what they would have inserted: the
same JSONEachRow lines the embedded backend hands chdb (POST /store/insert), and queries through the
store's /sql. The store names itself in <data dir>/worker.json as a worker does (pid, port, token; mode
0600), so only a process that can read that directory can reach it, and `flywheel sql` works as with a
worker.

A connection per call: a store restarting between two calls is found again through worker.json, and no
kept-alive socket closed by the other side turns into a failed insert.
"""

from __future__ import annotations

import http.client
from pathlib import Path
from urllib.parse import unquote, urlsplit

import orjson

from flywheel.clickhouse.embedded import json_lines
from flywheel.clickhouse.errors import ClickHouseBusy, ClickHouseUnavailable
from flywheel.clickhouse.owner import running_worker

SCHEME = "flywheel"
TIMEOUT_SECONDS = 300.0


class StoreError(RuntimeError):
    """ClickHouse refused the statement or the rows; the text is ClickHouse's (with its error code)."""


def store_dir(url: str) -> Path:
    parts = urlsplit(url)
    if parts.scheme != SCHEME or parts.netloc or not parts.path.startswith("/"):
        raise ValueError(f"a store's URL is flywheel:///<absolute path of its data directory>, got {url!r}")
    return Path(unquote(parts.path))


class StoreClickHouse:
    def __init__(self, url: str):
        self.path = store_dir(url)
        self.label = f"the embedded ClickHouse of the store at {self.path}"
        # Both waited for (a store and its workers started together): no store yet, or one still starting
        # (it names itself before it opens ClickHouse, applies the migrations and listens).
        store = running_worker(self.path)
        if store is None:
            raise ClickHouseBusy(f"no `flywheel store` runs on {self.path} (yet): start one there "
                                 f"(FLYWHEEL_DATA_DIR={self.path} flywheel store)")
        try:
            self._post("/health/live", b"", method="GET")
        except ClickHouseUnavailable as exc:
            raise ClickHouseBusy(f"the store at {self.path} (pid {store['pid']}) is starting: {exc}") from exc

    def _post(self, path: str, body: bytes, *, method: str = "POST") -> bytes:
        store = running_worker(self.path)
        if store is None:
            raise ClickHouseUnavailable(f"{self.label}: no store process runs there (any more)")
        conn = http.client.HTTPConnection(store["host"], store["port"], timeout=TIMEOUT_SECONDS)
        try:
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {store['token']}"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClickHouseUnavailable(f"{self.label} (pid {store['pid']}, port {store['port']}): {exc}") from exc
        finally:
            conn.close()
        if response.status == 200:
            return data
        try:
            message = orjson.loads(data)["error"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = data.decode("utf-8", "replace")[:500]
        if response.status == 400:
            raise StoreError(message)
        raise ClickHouseUnavailable(f"{self.label}: {response.status} {message}")

    def command(self, sql: str) -> None:
        self._post("/sql", sql.encode())

    def rows(self, sql: str) -> tuple[list[str], list[tuple]]:
        doc = orjson.loads(self._post("/sql", sql.encode()))
        return doc["columns"], [tuple(r) for r in doc["rows"]]

    def insert(self, table: str, rows: list[dict]) -> None:
        if rows:
            self._post(f"/store/insert?table={table}", json_lines(rows))

    def close(self) -> None:
        pass
