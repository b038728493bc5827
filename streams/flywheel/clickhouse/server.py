"""A ClickHouse server over the native protocol (clickhouse-driver)."""

from __future__ import annotations

import threading
from urllib.parse import urlsplit

from flywheel.clickhouse.errors import ClickHouseUnavailable


class ServerClickHouse:
    def __init__(self, url: str):
        from clickhouse_driver import Client

        parts = urlsplit(url)
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise ValueError(f"FLYWHEEL_CLICKHOUSE_URL must look like clickhouse://user:pass@host:9000/db, got {url!r}")
        safe = f"{parts.hostname}:{parts.port or 9000}"
        self.label = f"ClickHouse server at {safe}"
        self._client = Client.from_url(url)
        self._client.connection.connect_timeout = 5
        self._client.connection.send_receive_timeout = 60
        # clickhouse-driver's Client is not thread-safe.
        self._lock = threading.Lock()

    def _execute(self, sql: str, **kwargs):
        from clickhouse_driver.errors import NetworkError, SocketTimeoutError

        with self._lock:
            try:
                return self._client.execute(sql, **kwargs)
            except (NetworkError, SocketTimeoutError, EOFError, OSError) as exc:
                self._client.disconnect()
                raise ClickHouseUnavailable(f"{self.label}: {exc}") from exc

    def command(self, sql: str) -> None:
        self._execute(sql)

    def rows(self, sql: str) -> tuple[list[str], list[tuple]]:
        data, columns = self._execute(sql, with_column_types=True)
        return [name for name, _type in columns], [tuple(r) for r in data]

    def insert(self, table: str, rows: list[dict]) -> None:
        if not rows:
            return
        # Native protocol: the driver sends the rows as typed column blocks.
        columns = ", ".join(rows[0])
        self._execute(f"INSERT INTO {table} ({columns}) VALUES", params=rows, types_check=False)

    def close(self) -> None:
        with self._lock:
            self._client.disconnect()
