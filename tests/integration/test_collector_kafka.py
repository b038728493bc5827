"""The collector against real Kafka: every rejection writes nothing, Kafka down is 503 + Retry-After,
and an aborted transaction never reaches ClickHouse (the worker reads read_committed).

"Nothing reached events.raw" is checked by reading the topic to its end with a read_uncommitted
consumer, which also sees records of open or aborted transactions; each test then sends an accepted
request and finds it, so an empty read cannot pass for a broken reader.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid

import orjson
import pytest
import requests
from flywheel import devkafka
from flywheel.model.envelope import HEADER_RECEIVED_AT, HEADER_SOURCE
from flywheel.runtime.topics import ensure_topics
from helpers import CollectorProcess, WorkerProcess, free_port, read_topic, unique_settings, wait_until

pytestmark = pytest.mark.integration

KEY = "kafka-test-key"


@pytest.fixture(scope="module")
def collector(kafka, tmp_path_factory):
    settings = unique_settings(kafka, tmp_path_factory.mktemp("collector-kafka") / "flywheel", write_keys=KEY)
    ensure_topics(settings)  # the worker's job; no worker runs here
    process = CollectorProcess(settings).start()
    yield process
    process.stop()


def event(tag: str, i: int = 0, **extra) -> dict:
    return {"type": "track", "event": "Page Loaded", "anonymousId": f"{tag}-anon", "messageId": f"{tag}-{i}",
            **extra}


def post(collector: CollectorProcess, body: bytes, *, path: str = "/v1/batch", key: str | None = KEY,
         headers: dict | None = None) -> requests.Response:
    return requests.post(collector.url + path, data=body, auth=(key, "") if key else None,
                         headers=headers or {}, timeout=60)


def raw_values(settings) -> list[bytes]:
    return [r.value for r in read_topic(settings.kafka_bootstrap, settings.topics.raw)]


def assert_nothing_of(tag: str, collector: CollectorProcess) -> None:
    """No record of the rejected request is in events.raw, while a later accepted one is."""
    control = uuid.uuid4().hex[:10]
    assert post(collector, orjson.dumps({"batch": [event(control)]})).status_code == 200
    values = raw_values(collector.settings)
    assert any(control.encode() in v for v in values), "the control request is missing: reader broken?"
    assert not [v for v in values if tag.encode() in v], f"records of the rejected request {tag} were written"


def test_an_accepted_batch_is_in_events_raw_with_key_and_headers(collector):
    tag = uuid.uuid4().hex[:10]
    body = {"batch": [event(tag, i) for i in range(3)], "sentAt": "2026-11-21T12:00:00Z"}
    response = post(collector, gzip.compress(orjson.dumps(body)), headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json()) == (200, {"success": True})
    # acknowledged means committed: readable right away by a read_committed consumer
    mine = [r for r in read_topic(collector.settings.kafka_bootstrap, collector.settings.topics.raw,
                                  isolation_level="read_committed") if tag.encode() in r.value]
    assert len(mine) == 3
    for record in mine:
        headers = dict(record.headers)
        assert record.key == f"{tag}-anon".encode()
        assert headers[HEADER_SOURCE].startswith(b"writekey:") and KEY.encode() not in headers[HEADER_SOURCE]
        assert orjson.loads(record.value)["sentAt"] == "2026-11-21T12:00:00Z"
    assert len({dict(r.headers)[HEADER_RECEIVED_AT] for r in mine}) == 1


@pytest.mark.parametrize(("key", "body_key"), [("wrong-key", None), (None, None), (None, "wrong-key")])
def test_a_bad_write_key_is_401_and_writes_nothing(collector, key, body_key):
    tag = uuid.uuid4().hex[:10]
    body = {"batch": [event(tag)], **({"writeKey": body_key} if body_key else {})}
    response = post(collector, orjson.dumps(body), key=key)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized" and "write key" in response.json()["message"]
    assert_nothing_of(tag, collector)


def test_an_oversize_event_is_400_naming_the_limit_and_writes_nothing_of_the_batch(collector):
    tag = uuid.uuid4().hex[:10]
    big = event(tag, 1, properties={"blob": "x" * 33_000})
    response = post(collector, orjson.dumps({"batch": [event(tag, 0), big, event(tag, 2)]}))
    assert response.status_code == 400
    assert response.json()["code"] == "event_too_large"
    assert "32768 bytes per event" in response.json()["message"]
    assert_nothing_of(tag, collector)


def test_an_oversize_batch_is_400_naming_the_limit_and_writes_nothing(collector):
    tag = uuid.uuid4().hex[:10]
    items = [event(tag, i, properties={"blob": "x" * 20_000}) for i in range(30)]  # each fine, 600 KB in all
    response = post(collector, orjson.dumps({"batch": items}))
    assert response.status_code == 400
    assert response.json()["code"] == "request_too_large"
    assert "512000 bytes per request" in response.json()["message"]
    assert_nothing_of(tag, collector)


@pytest.mark.parametrize(("body", "encoding", "code", "message"), [
    ('{"batch": [{"messageId": "TAG-0", "type": "track",}]}', None, "malformed_json", "malformed JSON: "),
    ('{"batch": [{"messageId": "TAG-0"}]', None, "malformed_json", "line 1 column"),
    ('{"batch": [{"messageId": "TAG-0", "type": "track"}]}', "gzip", "bad_encoding", "cannot decode"),
])
def test_a_malformed_body_is_400_with_the_parsers_message_and_writes_nothing(collector, body, encoding, code,
                                                                              message):
    tag = uuid.uuid4().hex[:10]
    response = post(collector, body.replace("TAG", tag).encode(),
                    headers={"Content-Encoding": encoding} if encoding else {})
    assert response.status_code == 400
    assert response.json()["code"] == code and message in response.json()["message"]
    assert_nothing_of(tag, collector)


def test_no_broker_at_all_is_503_with_retry_after(tmp_path):
    closed = f"127.0.0.1:{free_port()}"
    settings = unique_settings(closed, tmp_path / "flywheel", write_keys=KEY, collector_timeout_seconds=3)
    process = CollectorProcess(settings).start()
    try:
        started = time.monotonic()
        response = post(process, orjson.dumps({"batch": [event("x")]}))
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
        assert response.json()["code"] == "kafka_unavailable"
        assert time.monotonic() - started < 15
    finally:
        process.stop()


def test_kafka_stopping_is_503_with_retry_after_and_nothing_of_that_request_lands(tmp_path):
    broker = devkafka.Broker(data_dir=tmp_path / "kafka", port=free_port(), controller_port=free_port())
    devkafka.start(broker)
    process = None
    try:
        settings = unique_settings(broker.bootstrap, tmp_path / "flywheel", write_keys=KEY,
                                   collector_timeout_seconds=3)
        ensure_topics(settings)
        process = CollectorProcess(settings).start()
        before, during, after = (uuid.uuid4().hex[:10] for _ in range(3))
        assert post(process, orjson.dumps({"batch": [event(before, i) for i in range(5)]})).status_code == 200

        def ready() -> requests.Response:
            return requests.get(f"{process.url}/health/ready", timeout=30)

        wait_until(lambda: ready().status_code == 200, timeout=30, what="the collector to be ready")
        devkafka.stop(broker)
        started = time.monotonic()
        response = post(process, orjson.dumps({"batch": [event(during, i) for i in range(5)]}))
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0 and response.json()["code"] == "kafka_unavailable"
        assert time.monotonic() - started < 20
        # out of the load balancer, saying why; alive all the same
        not_ready = wait_until(lambda: (r := ready()).status_code == 503 and r.json(), timeout=60,
                               what="the collector to report it is not ready")
        assert not_ready["reasons"][0].startswith("kafka: no answer from"), not_ready
        assert requests.get(f"{process.url}/health/live", timeout=10).status_code == 200

        devkafka.start(broker)  # same files, same ports: the collector reconnects by itself
        body = orjson.dumps({"batch": [event(after, i) for i in range(5)]})
        wait_until(lambda: post(process, body).status_code == 200, timeout=90,
                   what="the collector to recover")
        wait_until(lambda: ready().status_code == 200, timeout=60, what="the collector to be ready again")
        values = raw_values(settings)  # read_uncommitted: would show aborted records too
        assert sum(before.encode() in v for v in values) == 5
        assert sum(after.encode() in v for v in values) >= 5  # ≥: an attempt may have committed late
        assert not [v for v in values if during.encode() in v]
    finally:
        if process is not None:
            process.stop()
        devkafka.stop(broker)


def test_an_aborted_transaction_never_reaches_flywheel_events(pipeline_settings):
    """The worker reads events.raw read_committed (flywheel.read_committed), though Faust alone would not."""
    from aiokafka import AIOKafkaProducer

    tag = uuid.uuid4().hex[:10]
    worker = WorkerProcess(pipeline_settings).start()
    raw = pipeline_settings.topics.raw
    headers = [(HEADER_SOURCE, b"txn-test"), (HEADER_RECEIVED_AT, str(int(time.time() * 1000)).encode())]

    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=pipeline_settings.kafka_bootstrap,
                                    transactional_id=f"test-{tag}", enable_idempotence=True)
        await producer.start()
        try:
            await producer.begin_transaction()
            for i in range(3):
                await producer.send_and_wait(raw, orjson.dumps(event(tag, i, event="Aborted")),
                                             key=f"{tag}-anon".encode(), headers=headers)
            await producer.abort_transaction()
            await producer.begin_transaction()
            await producer.send_and_wait(raw, orjson.dumps(event(tag, 9, event="Committed")),
                                         key=f"{tag}-anon".encode(), headers=headers)
            await producer.commit_transaction()
        finally:
            await producer.stop()

    try:
        asyncio.run(write())
        # Same key, same partition, written after the aborted ones: once it is in, they were passed.
        count = "SELECT count() FROM flywheel.{} WHERE {}"
        wait_until(lambda: worker.scalar(count.format("events", f"message_id = '{tag}-9'")) == 1,
                   timeout=120, what="the committed event")
        assert worker.scalar(count.format("events", f"message_id LIKE '{tag}-%'")) == 1
        assert worker.scalar(count.format("invalid_events", f"position(payload, '{tag}') > 0")) == 0
        assert worker.metric("flywheel_events_received_total", source="txn-test") == 1
        # The aborted records are in the log (a read_uncommitted reader sees them): the worker skipped them.
        aborted = [v for v in raw_values(pipeline_settings) if b"Aborted" in v and tag.encode() in v]
        assert len(aborted) == 3
    finally:
        worker.stop()
