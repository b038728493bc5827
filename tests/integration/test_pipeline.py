"""The spine on a real broker and embedded ClickHouse: exact counts, DLQ reasons, kill -9 recovery, DLQ replay."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import yaml
from events_gen import generate
from flywheel.producer import Producer
from helpers import WorkerProcess, wait_until

pytestmark = pytest.mark.integration

EXPECTED_REASON = {
    "malformed_json": "malformed JSON",
    "no_ids": "neither 'userId' nor 'anonymousId' is set",
    "unknown_type": "unknown type 'purchase'",
    "wrong_property_type": "property 'product_id' must be string, got integer",
    "bad_timestamp": "unparseable timestamp",
}


def sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def send(settings, records) -> None:
    with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="test") as producer:
        for key, value in records:
            producer.send_raw(value, key=key)


def counts(worker: WorkerProcess) -> tuple[int, int]:
    return (
        worker.scalar("SELECT count() FROM flywheel.events FINAL"),
        worker.scalar("SELECT count() FROM flywheel.invalid_events FINAL"),
    )


def test_exactly_the_distinct_valid_events_land_and_every_invalid_one_has_a_reason(pipeline_settings):
    traffic = generate(10_000, retry_rate=0.02, n_invalid=300)
    worker = WorkerProcess(pipeline_settings).start()
    try:
        send(pipeline_settings, traffic.records)
        expected = (len(traffic.valid_ids), traffic.invalid)
        wait_until(lambda: counts(worker) == expected, timeout=180, what=f"{expected} rows")

        # Exact without FINAL too: no crash, so no redelivery, and retries never reached the sink.
        assert worker.scalar("SELECT count() FROM flywheel.events") == len(traffic.valid_ids)
        landed = {r[0] for r in worker.sql("SELECT message_id FROM flywheel.events")}
        assert landed == traffic.valid_ids

        for kind, n in traffic.invalid_by_kind.items():
            got = worker.scalar(
                "SELECT count() FROM flywheel.invalid_events "
                f"WHERE arrayExists(r -> position(r, {sql_string(EXPECTED_REASON[kind])}) > 0, reasons)"
            )
            assert got == n, f"{kind}: {got} of {n} with reason {EXPECTED_REASON[kind]!r}"
        assert worker.scalar("SELECT countIf(length(reasons) = 0 OR payload = '') FROM flywheel.invalid_events") == 0

        # received = valid + invalid, per source; the retries are counted as duplicates.
        received = worker.metric("flywheel_events_received_total", source="test")
        valid = worker.metric("flywheel_events_valid_total", source="test")
        invalid = worker.metric("flywheel_events_invalid_total", source="test")
        duplicates = worker.metric("flywheel_events_duplicate_total", source="test")
        assert received == len(traffic.records) == valid + invalid
        assert invalid == traffic.invalid
        assert duplicates == traffic.retries
        assert valid - duplicates == len(traffic.valid_ids)
    finally:
        worker.stop()


def test_sigkill_mid_stream_then_restart_loses_nothing_and_counts_nothing_twice(pipeline_settings):
    traffic = generate(10_000, retry_rate=0.02, n_invalid=300, seed=2)
    worker = WorkerProcess(pipeline_settings).start()
    sender = threading.Thread(target=send, args=(pipeline_settings, traffic.records))
    try:
        sender.start()
        # Kill once part of the stream is in ClickHouse and part is still to come.
        wait_until(lambda: worker.scalar("SELECT count() FROM flywheel.events") >= 1500,
                   timeout=120, what="the first rows", interval=0.2)
        worker.kill()
        sender.join()
        worker.start()
        expected = (len(traffic.valid_ids), traffic.invalid)
        wait_until(lambda: counts(worker) == expected, timeout=240, what=f"{expected} rows after restart")

        landed = {r[0] for r in worker.sql("SELECT message_id FROM flywheel.events FINAL")}
        assert landed == traffic.valid_ids
        twice = worker.scalar(
            "SELECT count() FROM (SELECT message_id FROM flywheel.events FINAL GROUP BY message_id HAVING count() > 1)"
        )
        assert twice == 0
        origins = worker.scalar("SELECT uniqExact(origin) FROM flywheel.invalid_events FINAL")
        assert origins == traffic.invalid
    finally:
        sender.join()
        worker.stop()


def test_rejected_events_replayed_after_the_plan_is_fixed_land_once(pipeline_settings, tmp_path):
    """`flywheel dlq replay` after a plan fix: the fixed events land once however often they are replayed,
    the still-bad ones are rejected again naming their original, and received = valid + invalid holds."""
    traffic = generate(1_000, retry_rate=0.0, n_invalid=100, seed=3)  # 20 rejected of each kind
    worker = WorkerProcess(pipeline_settings).start()
    try:
        send(pipeline_settings, traffic.records)
        wait_until(lambda: counts(worker) == (len(traffic.valid_ids), traffic.invalid), timeout=180,
                   what="the first rows")
        worker.stop()

        # The fix: product_id may be an integer too (the 20 'wrong_property_type' events sent 12345).
        plan = yaml.safe_load(pipeline_settings.tracking_plan.read_text())
        plan["events"]["Product Viewed"]["properties"]["product_id"] = {"type": "any", "required": True}
        fixed_plan = tmp_path / "tracking_plan.yaml"
        fixed_plan.write_text(yaml.safe_dump(plan))
        worker = WorkerProcess(pipeline_settings, extra_env={"FLYWHEEL_TRACKING_PLAN": str(fixed_plan)}).start()

        def flywheel(*args: str) -> str:
            done = subprocess.run([sys.executable, "-m", "flywheel.cli", "dlq", "replay", *args], env=worker.env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            return done.stdout

        dry = flywheel("--dry-run", "--source", "test")
        assert dry.startswith("100 rejected events received 2026-") and "replayed" not in dry
        assert worker.metric("flywheel_events_replayed_total", source="test") == 0

        fixed = traffic.invalid_by_kind["wrong_property_type"]
        still_bad = traffic.invalid - fixed
        assert "replayed 100 events" in flywheel()
        wait_until(lambda: counts(worker) == (len(traffic.valid_ids) + fixed, traffic.invalid + still_bad),
                   timeout=180, what="the fixed events and the re-rejected ones")
        # Landed once each, with their own source and first receipt's time.
        landed = worker.sql("SELECT message_id, source, toUnixTimestamp64Milli(received_at) FROM flywheel.events "
                            "WHERE startsWith(message_id, 'bad-wrong_property_type-')")
        originals = worker.sql("SELECT JSONExtractString(payload, 'messageId'), source, "
                               "toUnixTimestamp64Milli(received_at) FROM flywheel.invalid_events "
                               "WHERE replay_of = '' AND position(payload, 'bad-wrong_property_type-') > 0")
        assert len(landed) == fixed and sorted(map(tuple, landed)) == sorted(map(tuple, originals))
        # Every re-rejected row names a rejected original.
        assert worker.scalar("SELECT count() FROM flywheel.invalid_events WHERE replay_of != '' AND "
                             "replay_of NOT IN (SELECT origin FROM flywheel.invalid_events WHERE replay_of = '')") == 0

        # A second run: all 100 again. The fixed ones are dropped as duplicates; nothing lands twice.
        assert "replayed 100 events" in flywheel()
        wait_until(lambda: worker.metric("flywheel_events_replayed_total", source="test") == 200, timeout=180,
                   what="the second replay through ingest")
        wait_until(lambda: counts(worker)[1] == traffic.invalid + 2 * still_bad, timeout=180,
                   what="the re-rejected rows of the second replay")
        assert worker.scalar("SELECT count() FROM flywheel.events") == len(traffic.valid_ids) + fixed  # no FINAL
        received = worker.metric("flywheel_events_received_total", source="test")
        valid = worker.metric("flywheel_events_valid_total", source="test")
        invalid = worker.metric("flywheel_events_invalid_total", source="test")
        assert received == 200 == valid + invalid  # this worker saw only the replays
        assert (valid, invalid) == (2 * fixed, 2 * still_bad)
        assert worker.metric("flywheel_events_duplicate_total", source="test") == fixed
    finally:
        worker.stop()
