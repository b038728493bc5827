"""Where Flywheel's data files live: the repo's `sql/`, `schemas/` and `kafka/` folders.

They are data, not code, so they stay at the top of the repository where operators edit them. An
installed (non-editable) copy points at them with FLYWHEEL_HOME; a checkout finds them next to
`streams/`.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    explicit = os.environ.get("FLYWHEEL_HOME")
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parents[2]


def sql_dir() -> Path:
    """FLYWHEEL_SQL_DIR overrides it (e.g. a schema shaped for an older server in tests)."""
    explicit = os.environ.get("FLYWHEEL_SQL_DIR")
    return Path(explicit) if explicit else home() / "sql"


def schemas_dir() -> Path:
    return home() / "schemas"


def kafka_pom() -> Path:
    return home() / "kafka" / "pom.xml"
