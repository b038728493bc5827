"""The README's promises: `make run` brings up Kafka and a worker on embedded ClickHouse that answers
`flywheel sql`; and a test that needs a missing service fails under CI=true instead of skipping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from helpers import REPO, free_port, wait_until

pytestmark = pytest.mark.integration

FLYWHEEL = str(REPO / ".venv" / "bin" / "flywheel")


def test_make_run_starts_kafka_and_a_worker_that_answers_flywheel_sql(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")} | {
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "FLYWHEEL_HTTP_PORT": str(free_port()),
    }
    log = open(tmp_path / "make-run.log", "wb")
    run = subprocess.Popen(["make", "run"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, start_new_session=True)

    def flywheel(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([FLYWHEEL, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    try:
        wait_until(lambda: (tmp_path / "data" / "worker.json").exists() or run.poll() is not None,
                   timeout=240, what="make run to start a worker")
        assert run.poll() is None, (tmp_path / "make-run.log").read_text()[-3000:]
        sent = flywheel("sample", "--events", "500")
        assert sent.returncode == 0 and "sent 500 events" in sent.stdout, sent.stderr

        def answered() -> bool:
            out = flywheel("sql", "SELECT count() FROM flywheel.events", "--format", "tsv")
            return out.returncode == 0 and out.stdout.splitlines()[-1] == "500"

        wait_until(answered, timeout=120, what="flywheel sql to count the 500 sample events")

        # the default metrics file (schemas/metrics.yaml) is live on the same sample: views fill and the
        # operator's check agrees with ClickHouse's own functions
        def views_filled() -> bool:
            out = flywheel("sql", "SELECT (SELECT count() FROM flywheel.funnel_daily) > 0 AND "
                           "(SELECT count() FROM flywheel.active_users_daily) > 0", "--format", "tsv")
            return out.returncode == 0 and out.stdout.splitlines()[-1] == "1"

        wait_until(views_filled, timeout=120, what="funnel_daily and active_users_daily to fill")
        verified = wait_until(lambda: (lambda r: r if r.returncode == 0 else None)(flywheel("metrics", "verify")),
                              timeout=120, what="flywheel metrics verify to pass", interval=3)
        assert "equal the oracles" in verified.stdout
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
        flywheel("kafka", "stop")
        log.close()


@pytest.mark.parametrize("missing", ["kafka", "clickhouse-server"])
def test_a_test_whose_service_is_missing_fails_under_ci(missing, tmp_path):
    env = os.environ | {"CI": "true"}
    if missing == "kafka":
        env["FLYWHEEL_TEST_KAFKA"] = f"127.0.0.1:{free_port()}"  # nothing listens there
        target = ("tests/integration/test_pipeline.py::"
                  "test_exactly_the_distinct_valid_events_land_and_every_invalid_one_has_a_reason")
    else:
        env["FLYWHEEL_TEST_CLICKHOUSE_SERVER"] = str(tmp_path / "no-such-clickhouse-server")
        target = "tests/integration/test_clickhouse_server.py"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", target],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = out.stdout.strip().splitlines()[-1]
    assert out.returncode == 1, out.stdout[-3000:]
    assert "1 error" in summary and "skipped" not in summary and "passed" not in summary, summary
    assert "is required and unavailable" in out.stdout
