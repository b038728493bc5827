"""Start-up of `flywheel worker`: check the inputs, prepare ClickHouse and Kafka, run the Faust worker."""

from __future__ import annotations

import logging

from flywheel import clickhouse, paths
from flywheel.clickhouse import migrate
from flywheel.config import Settings
from flywheel.observability import setup_logging

log = logging.getLogger(__name__)


def run(settings: Settings) -> None:
    setup_logging(settings.log_level)
    from faust import Worker

    from flywheel.app import create_app
    from flywheel.plan import load_plan
    from flywheel.topics import ensure_topics

    load_plan(settings.tracking_plan)  # fail before touching anything if the plan is wrong
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ch = clickhouse.connect(url=settings.clickhouse_url, data_dir=settings.clickhouse_dir)
    applied = migrate.apply(ch, paths.sql_dir() / "migrations")
    log.info("ClickHouse: %s (%s)", ch.label, f"applied {applied}" if applied else "schema up to date")
    ensure_topics(settings)
    app = create_app(settings, ch)
    Worker(app, loglevel=settings.log_level.upper()).execute_from_commandline()
