"""Fixtures of the unit tests (the session's are in tests/conftest.py)."""

from __future__ import annotations

import pytest
from flywheel import paths
from flywheel.clickhouse.embedded import EmbeddedClickHouse
from flywheel.clickhouse.migrate import apply as migrate


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    """An embedded ClickHouse with the repository's migrations, one per test module (chdb runs one engine
    per process: each module's is closed before the next opens). A module may define its own."""
    engine = EmbeddedClickHouse(tmp_path_factory.mktemp("chdb"))
    migrate(engine, paths.sql_dir() / "migrations")
    yield engine
    engine.close()
