"""The spine on a real broker and embedded ClickHouse: exact counts, DLQ reasons, kill -9 recovery."""

from __future__ import annotations

import threading

import pytest
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
