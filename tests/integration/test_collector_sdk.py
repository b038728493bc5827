"""Segment SDKs → the worker's collector → Kafka → flywheel.events, on a real broker and embedded ClickHouse.

The real `segment-analytics-python` client is pointed at the worker with `host=`; nothing is mocked.
One worker serves the whole module (its start-up dominates the cost); every test tags its ids.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import requests
from flywheel.collector.auth import source_label
from helpers import WorkerProcess, unique_settings, wait_until
from segment.analytics import Client

pytestmark = pytest.mark.integration

KEY = "sdk-test-key"


@pytest.fixture(scope="module")
def worker(kafka, tmp_path_factory):
    settings = unique_settings(kafka, tmp_path_factory.mktemp("collector-sdk") / "flywheel",
                               write_keys=f"{KEY},another-key")
    worker = WorkerProcess(settings).start()
    wait_until(lambda: worker.get("/health"), timeout=60, what="the worker's web server")
    yield worker
    worker.stop()


def url(worker: WorkerProcess) -> str:
    return f"http://127.0.0.1:{worker.settings.http_port}"


def sdk(worker: WorkerProcess, *, gzip: bool, sync: bool, errors: list) -> Client:
    return Client(
        KEY, host=url(worker), gzip=gzip, sync_mode=sync, max_retries=1, upload_size=100,
        on_error=lambda exc, batch: errors.append(exc),
    )


def rows(worker: WorkerProcess, where: str) -> list[dict]:
    columns = ["message_id", "type", "event", "anonymous_id", "user_id", "previous_id", "group_id",
               "toUnixTimestamp64Milli(timestamp)", "toUnixTimestamp64Milli(received_at)", "properties",
               "traits", "context", "source"]
    found = worker.sql(f"SELECT {', '.join(columns)} FROM flywheel.events WHERE {where} ORDER BY message_id")
    names = [c.split("(")[-1].rstrip(")") for c in columns]
    return [dict(zip(names, r, strict=True)) for r in found]


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


@pytest.mark.parametrize(("gzip", "sync"), [(False, True), (True, True), (False, False), (True, False)],
                         ids=["plain-per-call", "gzip-per-call", "plain-batched", "gzip-batched"])
def test_every_call_type_lands_with_its_type_ids_time_and_properties(worker, gzip, sync):
    tag = uuid.uuid4().hex[:10]
    anon, anon2, user, org = f"{tag}-anon", f"{tag}-anon2", f"{tag}-user", f"{tag}-org"
    t0 = datetime.now(UTC).replace(microsecond=123_000) - timedelta(hours=3)
    at = [t0 + timedelta(minutes=i) for i in range(6)]
    errors: list = []
    client = sdk(worker, gzip=gzip, sync=sync, errors=errors)
    client.track(anonymous_id=anon, event="Product Viewed", properties={"product_id": "p1", "price": 9.5},
                 timestamp=at[0], message_id=f"{tag}-1")
    client.identify(user_id=user, anonymous_id=anon, traits={"email": "a@example.com"}, timestamp=at[1],
                    message_id=f"{tag}-2")
    client.alias(previous_id=anon2, user_id=user, timestamp=at[2], message_id=f"{tag}-3")
    client.page(anonymous_id=anon, name="Home", properties={"path": "/"}, timestamp=at[3],
                message_id=f"{tag}-4")
    client.screen(user_id=user, name="Dashboard", properties={"tab": 2}, timestamp=at[4],
                  message_id=f"{tag}-5")
    client.group(user_id=user, group_id=org, traits={"plan": "pro"}, timestamp=at[5], message_id=f"{tag}-6")
    if not sync:
        client.flush()  # one /v1/batch request with the 6 calls
        client.join()
    assert errors == []

    where = f"message_id LIKE '{tag}-%'"
    wait_until(lambda: len(rows(worker, where)) == 6, timeout=120, what="the 6 SDK calls in flywheel.events")
    got = {r["message_id"]: r for r in rows(worker, where)}
    expected = {
        f"{tag}-1": ("track", "Product Viewed", anon, "", "", ""),
        f"{tag}-2": ("identify", "", anon, user, "", ""),
        f"{tag}-3": ("alias", "", "", user, anon2, ""),
        f"{tag}-4": ("page", "Home", anon, "", "", ""),
        f"{tag}-5": ("screen", "Dashboard", "", user, "", ""),
        f"{tag}-6": ("group", "", "", user, "", org),
    }
    for i, (mid, (mtype, event, anonymous_id, user_id, previous_id, group_id)) in enumerate(expected.items()):
        row = got[mid]
        assert (row["type"], row["event"], row["anonymous_id"], row["user_id"], row["previous_id"],
                row["group_id"]) == (mtype, event, anonymous_id, user_id, previous_id, group_id), row
        assert row["timestamp"] == ms(at[i]), "server SDKs send an explicit timestamp: taken as sent"
        assert row["source"] == source_label(KEY)
        context = orjson.loads(row["context"])
        assert context["ip"] == "127.0.0.1" and context["library"]["name"] == "analytics-python"
    assert orjson.loads(got[f"{tag}-1"]["properties"]) == {"product_id": "p1", "price": 9.5}
    assert orjson.loads(got[f"{tag}-4"]["properties"]) == {"path": "/"}
    assert orjson.loads(got[f"{tag}-5"]["properties"]) == {"tab": 2}
    assert orjson.loads(got[f"{tag}-2"]["traits"]) == {"email": "a@example.com"}
    assert orjson.loads(got[f"{tag}-6"]["traits"]) == {"plan": "pro"}
    # Every event of one request shares one receivedAt.
    if not sync:
        assert len({r["received_at"] for r in got.values()}) == 1


def test_a_call_retried_with_the_same_message_id_lands_once(worker):
    tag = uuid.uuid4().hex[:10]
    anon = f"{tag}-anon"
    errors: list = []
    client = sdk(worker, gzip=False, sync=True, errors=errors)
    for _ in range(3):  # the original and two retries of it, as an SDK sends them
        client.track(anonymous_id=anon, event="Signed Up", properties={"method": "email"},
                     message_id=f"{tag}-once")
    # Same key → same partition, after the retries: once it is in, the retries were handled.
    client.track(anonymous_id=anon, event="Signed Up", message_id=f"{tag}-later")
    assert errors == []
    count = "SELECT count() FROM flywheel.events WHERE message_id = '{}'"
    wait_until(lambda: worker.scalar(count.format(f"{tag}-later")) == 1, timeout=120, what="the marker event")
    assert worker.scalar(count.format(f"{tag}-once")) == 1


def test_browser_events_get_clock_skew_corrected_from_the_batch_sent_at(worker):
    """analytics.js shape: originalTimestamp per item, sentAt per batch, device clock 1 h fast."""
    tag = uuid.uuid4().hex[:10]
    skew = timedelta(hours=1)
    device_now = datetime.now(UTC) + skew
    sent_at = device_now.isoformat(timespec="milliseconds")
    items = [
        {"type": "track", "event": "Products Searched", "anonymousId": f"{tag}-anon",
         "messageId": f"{tag}-{i}",
         "originalTimestamp": (device_now - timedelta(seconds=10 * i)).isoformat(timespec="milliseconds"),
         "properties": {"query": "shoes"}}
        for i in range(3)
    ]
    body = {"batch": items, "sentAt": sent_at, "writeKey": KEY,
            "context": {"library": {"name": "analytics.js"}, "userAgent": "test"}}
    response = requests.post(f"{url(worker)}/v1/batch", data=orjson.dumps(body),
                             headers={"Content-Type": "text/plain"}, timeout=30)
    assert response.status_code == 200 and response.json() == {"success": True}

    where = f"message_id LIKE '{tag}-%'"
    wait_until(lambda: len(rows(worker, where)) == 3, timeout=120, what="the browser batch")
    for row in rows(worker, where):
        i = int(row["message_id"].rsplit("-", 1)[1])
        # timestamp = receivedAt − (sentAt − originalTimestamp), to the millisecond
        assert row["timestamp"] == row["received_at"] - 10_000 * i
        assert abs(row["timestamp"] - ms(datetime.now(UTC))) < 120_000 + 10_000 * i  # the skew is gone
        context = orjson.loads(row["context"])
        assert context["library"]["name"] == "analytics.js" and context["ip"] == "127.0.0.1"


def test_an_invalid_event_in_an_accepted_batch_goes_to_the_dlq_with_a_reason(worker):
    tag = uuid.uuid4().hex[:10]
    auth = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    body = {"batch": [
        {"type": "track", "event": "Order Completed", "anonymousId": f"{tag}-a", "messageId": f"{tag}-bad",
         "properties": {"order_id": 42, "revenue": 1.0}},
        {"type": "track", "event": "Page Loaded", "anonymousId": f"{tag}-a", "messageId": f"{tag}-good"},
    ]}
    response = requests.post(f"{url(worker)}/v1/batch", data=orjson.dumps(body),
                             headers={"Authorization": auth}, timeout=30)
    assert response.status_code == 200

    def dlq() -> list:
        return worker.sql("SELECT reasons, source FROM flywheel.invalid_events "
                          f"WHERE position(payload, '{tag}-bad') > 0")

    wait_until(lambda: dlq() and rows(worker, f"message_id = '{tag}-good'"), timeout=120,
               what="the DLQ row and the valid row")
    ((reasons, source),) = dlq()
    assert any("property 'order_id' must be string" in r for r in reasons) and source == source_label(KEY)
    assert rows(worker, f"message_id = '{tag}-bad'") == []


def test_collector_metrics_on_the_worker(worker):
    ok = requests.post(f"{url(worker)}/v1/track", auth=(KEY, ""), timeout=30,
                       data=orjson.dumps({"event": "Signed Up", "userId": "metrics-user"}))
    bad = requests.post(f"{url(worker)}/v1/track", data=b"{", auth=(KEY, ""), timeout=30)
    assert (ok.status_code, bad.status_code) == (200, 400)
    assert worker.metric("flywheel_collector_rejects_total", reason="malformed_json") >= 1
    assert worker.metric("flywheel_collector_requests_total", path="track", status="400") >= 1
    assert worker.metric("flywheel_collector_requests_total", path="track", status="200") >= 1
    assert worker.metric("flywheel_collector_events_accepted_total", source=source_label(KEY)) >= 1
    assert worker.metric("flywheel_collector_transactions_total", outcome="committed") >= 1
    assert worker.metric("flywheel_collector_produce_seconds_count") >= 1


def listening_address(port: int) -> str:
    """The local address a TCP socket listens on at `port` (/proc/net/tcp; state 0A = LISTEN)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            return ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on port {port}")


def test_the_public_listener_serves_the_collector_only_and_the_admin_one_stays_private(worker):
    """Two listeners: /v1/* and /health on the public port (all interfaces); /sql and /metrics only on the
    admin port, bound to 127.0.0.1 by default."""
    public, admin = worker.settings.http_port, worker.settings.admin_port
    assert requests.get(f"http://127.0.0.1:{public}/health", timeout=10).status_code == 200
    for path, method in (("/sql", requests.post), ("/metrics", requests.get)):
        assert method(f"http://127.0.0.1:{public}{path}", timeout=10).status_code == 404
    assert requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).status_code == 200
    assert requests.post(f"http://127.0.0.1:{admin}/sql", data="SELECT 1", timeout=10).status_code == 401  # token
    assert requests.post(f"http://127.0.0.1:{admin}/v1/track", timeout=10).status_code == 404
    assert (listening_address(public), listening_address(admin)) == ("0.0.0.0", "127.0.0.1")


def test_a_running_worker_is_ready_and_says_how_it_is_doing(worker):
    import subprocess
    import sys

    wait_until(lambda: worker.ready()["ready"], timeout=60, what="the worker to be ready")
    assert requests.get(f"http://127.0.0.1:{worker.settings.admin_port}/health/live", timeout=10).status_code == 200
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "status"], env=worker.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"worker at http://127.0.0.1:{worker.settings.admin_port}: ready")
    for stage in ("ingest", "aggregate", "sink_funnels", "sink_identity", "sink_invalid"):
        assert f"\n{stage} " in out.stdout
    assert "clickhouse inserts: ok" in out.stdout
    doc = orjson.loads(subprocess.run([sys.executable, "-m", "flywheel.cli", "status", "--json"], env=worker.env,
                                      capture_output=True, text=True, timeout=60).stdout)
    assert doc["ready"]["ready"] and doc["status"]["stages"]["ingest"]["topic"] == worker.settings.topics.raw
    raw = worker.settings.topics.raw
    assert f'flywheel_consumer_lag{{partition="0",topic="{raw}"}}' in worker.get("/metrics").decode()
