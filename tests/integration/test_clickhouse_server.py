"""The server path (clickhouse-driver, native protocol) on a real clickhouse-server that goes away
mid-run: the sink waits and retries, consumption pauses, and nothing is lost.

Debian's server is 18.16, so the tables use a shape it accepts (tests/integration/sql_18_16); this
test is about transport, batching and retries, not the schema (which chdb tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from events_gen import generate
from flywheel.clickhouse.server import ServerClickHouse
from helpers import WorkerProcess, wait_until
from test_pipeline import send

pytestmark = pytest.mark.integration

SQL_18_16 = Path(__file__).parent / "sql_18_16"


def test_server_stopped_mid_run_then_started_loses_nothing(pipeline_settings, clickhouse_server):
    settings = pipeline_settings.model_copy(update={"clickhouse_url": clickhouse_server.url, "sink_batch_size": 500})
    traffic = generate(6_000, retry_rate=0.02, n_invalid=100, seed=3)
    half = len(traffic.records) // 2
    worker = WorkerProcess(settings, extra_env={"FLYWHEEL_SQL_DIR": str(SQL_18_16)}).start()

    def count(sql: str) -> int:
        ch = ServerClickHouse(clickhouse_server.url)
        try:
            return ch.rows(sql)[1][0][0]
        finally:
            ch.close()

    try:
        send(settings, traffic.records[:half])
        wait_until(lambda: count("SELECT count() FROM flywheel.events") > 0, timeout=120, what="first rows")

        clickhouse_server.stop()
        send(settings, traffic.records[half:])
        # The sink notices, says so in its metrics, and keeps the rest waiting in Kafka.
        wait_until(lambda: worker.metric("flywheel_sink_blocked", table="flywheel.events") == 1,
                   timeout=120, what="the sink to report it is blocked")
        assert worker.metric("flywheel_sink_failures_total", table="flywheel.events", kind="retry") >= 1
        assert "insert into flywheel.events failed; its topic waits for ClickHouse" in worker.log_path.read_text()
        # the worker is not ready, and says why; its collector stays ready: events wait in Kafka
        reasons = worker.ready()["reasons"]
        assert any(r.startswith("clickhouse: inserts failing for") and "flywheel.events" in r for r in reasons), reasons
        assert worker.ready(public=True) == {"ready": True, "role": "collector", "reasons": []}
        status = subprocess.run([sys.executable, "-m", "flywheel.cli", "status"], env=worker.env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 1 and "NOT READY" in status.stdout and "flywheel.events waiting" in status.stdout

        clickhouse_server.start()
        expected_valid, expected_invalid = len(traffic.valid_ids), traffic.invalid
        wait_until(lambda: (count("SELECT count() FROM flywheel.events FINAL"),
                            count("SELECT count() FROM flywheel.invalid_events FINAL"))
                   == (expected_valid, expected_invalid),
                   timeout=240, what=f"{expected_valid} valid and {expected_invalid} invalid rows")
        assert count("SELECT uniqExact(message_id) FROM flywheel.events") == expected_valid
        assert worker.metric("flywheel_sink_blocked", table="flywheel.events") == 0
        assert "ClickHouse is back" in worker.log_path.read_text()
        # metric partials take the same native path (Date columns, versioned rows) through the outage
        wait_until(lambda: count("SELECT count() FROM flywheel.funnel_partials") > 0
                   and count("SELECT count() FROM flywheel.active_user_partials") > 0,
                   timeout=120, what="metric partials on the server")
        assert worker.metric("flywheel_sink_blocked", table="flywheel.funnel_partials") == 0
        wait_until(lambda: worker.ready()["ready"] or None, timeout=60, what="the worker to be ready again")
    finally:
        worker.stop()
