"""Apply `sql/migrations/NNNN_name.sql` in order, once each, recorded in flywheel.schema_migrations.

Idempotent and safe to run from several workers at once: every statement is written to be re-runnable
(IF NOT EXISTS, CREATE OR REPLACE VIEW), and the version table only tells which files to skip.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from flywheel.clickhouse import ClickHouse

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_STATEMENT_END = re.compile(r";\s*$", re.MULTILINE)


def migration_files(folder: Path) -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"{path}: migration files are named NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), path))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{folder}: two migrations share a version number")
    return found


def statements(sql: str) -> list[str]:
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in _STATEMENT_END.split(body) if s.strip()]


def apply(ch: ClickHouse, folder: Path) -> list[str]:
    """Bring the database to the newest version; return the names applied now."""
    ch.command("CREATE DATABASE IF NOT EXISTS flywheel")
    ch.command(
        "CREATE TABLE IF NOT EXISTS flywheel.schema_migrations "
        "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    _, rows = ch.rows("SELECT version FROM flywheel.schema_migrations")
    done = {int(r[0]) for r in rows}
    applied = []
    for version, name, path in migration_files(folder):
        if version in done:
            continue
        for statement in statements(path.read_text()):
            ch.command(statement)
        ch.insert("flywheel.schema_migrations", [{"version": version, "name": name}])
        log.info("applied migration %04d_%s to %s", version, name, ch.label)
        applied.append(f"{version:04d}_{name}")
    return applied
