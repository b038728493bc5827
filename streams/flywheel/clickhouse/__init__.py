"""ClickHouse behind one interface, two backends (docs/design.md §5).

- `EmbeddedClickHouse`: chdb, the ClickHouse engine in-process, data under FLYWHEEL_DATA_DIR. Default.
- `ServerClickHouse`: a server over the native protocol (clickhouse-driver), when FLYWHEEL_CLICKHOUSE_URL
  is clickhouse://….
- `StoreClickHouse`: the embedded ClickHouse of a `flywheel store` process on this machine, when
  FLYWHEEL_CLICKHOUSE_URL is flywheel:///<its data directory> (several workers, one embedded store).

Both take the same SQL and the same rows (dicts of Python values), so the sink, migrations and `flywheel sql` do not
know which one they talk to. Calls are synchronous: async callers run them in an executor.
"""

from __future__ import annotations

from typing import Protocol

from flywheel.clickhouse.errors import ClickHouseBusy, ClickHouseUnavailable, is_bad_data

__all__ = ["ClickHouse", "ClickHouseBusy", "ClickHouseUnavailable", "connect", "is_bad_data"]


class ClickHouse(Protocol):
    label: str

    def command(self, sql: str) -> None:
        """Run a statement whose result is not needed (DDL, INSERT … SELECT)."""

    def rows(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Run a query; return column names and rows of Python values."""

    def insert(self, table: str, rows: list[dict]) -> None:
        """Insert rows (same keys = column names; Python values, aware datetimes) into `table`."""

    def close(self) -> None: ...


def connect(*, url: str | None, data_dir) -> ClickHouse:
    if url and url.startswith("flywheel:"):
        from flywheel.clickhouse.store import StoreClickHouse

        return StoreClickHouse(url)
    if url:
        from flywheel.clickhouse.server import ServerClickHouse

        return ServerClickHouse(url)
    from flywheel.clickhouse.embedded import EmbeddedClickHouse

    return EmbeddedClickHouse(data_dir)
