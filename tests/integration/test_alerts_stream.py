"""Alerts end to end (issue 15): two workers on real Kafka, a real local webhook receiver, and a clock file
both workers read (FLYWHEEL_CLOCK_FILE), moved hour by hour.

One stream checks: events drive series across thresholds and each transition reaches the webhook signed,
once, although two workers share the inputs; a jump in invalid events fires; the receiver down, then up:
each transition arrives once; a source going quiet fires; the receiver down, a kill -9 of a worker while
deliveries fail, then the receiver up: every transition arrives, with exactly one idempotency key each; a
funnel conversion and a DAU rule fire from the aggregate's cells; each stored transition's value equals the
oracle (oracle.alert_series_sql over the union of the workers' stores).
"""

from __future__ import annotations

import functools
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import yaml
from flywheel.metrics import alerts as rules
from flywheel.metrics.definitions import parse_metrics
from flywheel.metrics.oracle import alert_series_sql
from flywheel.producer import Producer
from flywheel.web import webhooks
from helpers import WorkerProcess, committed_through, free_port, settled, unique_settings, wait_until
from union_store import union_of

H0 = datetime(2026, 10, 1, 10, tzinfo=UTC)
H1, H2 = H0 + timedelta(hours=1), H0 + timedelta(hours=2)
D0 = datetime(2026, 10, 1, tzinfo=UTC)
SECRET = "s3cret-for-the-test"

RULES = """
funnels:
  - name: checkout
    window: 1h
    steps: [{event: Product Viewed}, {event: Order Completed}]
alerts:
  - name: orders_low
    series: {events: Order Completed, period: hour}
    rule: {threshold: {below: 3}}
  - name: invalid_jump
    series: {invalid_rate: true, source: any, period: hour}
    rule: {threshold: {above: 0.2}, min_count: 5}
  - name: web_quiet
    series: {events: any, source: web, period: hour}
    rule: {relative: {vs: previous_period, below: -0.8}}
  - name: conversion_low
    series: {funnel: checkout, step: 2, rate: true}
    rule: {threshold: {below: 0.8}}
  - name: few_daily_users
    series: {active: dau}
    rule: {threshold: {below: 100}}
"""


class Receiver:
    """A webhook receiver: answers `status` (200, or 503 while "down"), checks signatures, records all."""

    def __init__(self) -> None:
        self.status = 200
        self.calls: list[dict] = []  # {"key", "status", "body", "signed"}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                signed = webhooks.verify(SECRET, self.headers.get(webhooks.SIGNATURE, ""), body)
                with receiver.lock:
                    status = receiver.status
                    receiver.calls.append({"key": self.headers.get(webhooks.IDEMPOTENCY), "status": status,
                                           "body": orjson.loads(body), "signed": signed})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict]:
        with self.lock:
            return [c for c in self.calls if c["status"] == 200]

    def refused(self) -> list[dict]:
        with self.lock:
            return [c for c in self.calls if c["status"] != 200]


def transition(body: dict) -> tuple[str, str, str]:
    return body["alert"], body["state"], body["period"][:16]


def iso(t: datetime) -> str:
    return t.isoformat()[:16]


def test_alerts_end_to_end(kafka, tmp_path):
    receiver = Receiver()
    hook = {"webhook": receiver.url, "secret_env": "FLYWHEEL_TEST_HOOK_SECRET", "slack": True}
    spec = yaml.safe_load(RULES)
    for rule in spec["alerts"]:
        rule.update(grace="1s", notify=[hook])
    metrics = parse_metrics(spec)
    metrics_file = tmp_path / "metrics.yaml"
    metrics_file.write_text(yaml.safe_dump(spec))
    clock = tmp_path / "clock"

    def at(t: datetime) -> None:
        clock.write_text(str(int(t.timestamp() * 1000)))

    at(H0 + timedelta(minutes=10))
    a = unique_settings(kafka, tmp_path / "a", metrics=metrics_file, clock_file=clock, alert_tick_seconds=0.5,
                        alert_webhooks=f"http://127.0.0.1:{receiver.server.server_port}/", segment_sweep_seconds=1)
    b = a.model_copy(update={"data_dir": tmp_path / "b", "http_port": free_port(), "admin_port": free_port()})
    env = {"FLYWHEEL_TEST_HOOK_SECRET": SECRET}
    workers = [WorkerProcess(a, extra_env=env), WorkerProcess(b, extra_env=env)]

    def logs() -> str:
        return "".join(w.log_path.read_text(errors="replace") for w in workers if w.log_path.exists())

    def send(events: list[tuple[datetime, dict]], invalid: list[datetime] = ()) -> None:
        with Producer(a.kafka_bootstrap, topic=a.topics.raw, source="web") as p:
            for when, message in events:
                p.send({**message, "timestamp": when.isoformat()}, received_at=when)
            for when in invalid:
                p.send_raw(b'{"type": "track", "event": 42}', key="bad", received_at=when)

    def event(name: str, user: int, when: datetime) -> tuple[datetime, dict]:
        props = {"product_id": "p1"} if name == "Product Viewed" else {"order_id": f"o{user}-{when}", "revenue": 5}
        return when, {"type": "track", "event": name, "userId": f"u{user}", "properties": props,
                      "messageId": f"{name}-{user}-{when.isoformat()}"}

    def delivered() -> set[tuple[str, str, str]]:
        return {transition(c["body"]) for c in receiver.delivered()}

    try:
        for w in workers:
            w.start()
        wait_until(functools.partial(settled, kafka, a, 2), timeout=180, what="both workers to own partitions")
        wait_until(lambda: all(f"alert {r.name} (version" in logs() for r in metrics.alerts), timeout=120,
                   what="every rule to start")

        # hour 0: 12 persons view, 2 buy; 1 invalid record of 15
        t = H0 + timedelta(minutes=10)
        send([event("Product Viewed", u, t + timedelta(seconds=u)) for u in range(1, 13)]
             + [event("Order Completed", u, t + timedelta(minutes=5, seconds=u)) for u in (1, 2)],
             invalid=[t + timedelta(seconds=30)])
        at(H1 + timedelta(seconds=10))  # hour 0 closes: 2 orders < 3
        wait_until(lambda: delivered() == {("orders_low", "firing", iso(H0))}, timeout=120,
                   what="the orders_low webhook")

        # hour 1: 5 buy, 5 view; 8 invalid of 18. The receiver is down when the hour closes, then up
        receiver.status = 503
        t = H1 + timedelta(minutes=5)
        send([event("Order Completed", u, t + timedelta(seconds=u)) for u in range(1, 6)]
             + [event("Product Viewed", u, t + timedelta(seconds=10 + u)) for u in range(6, 11)],
             invalid=[t + timedelta(seconds=20 + i) for i in range(8)])
        at(H2 + timedelta(seconds=10))
        expected_h1 = {("orders_low", "resolved", iso(H1)), ("invalid_jump", "firing", iso(H1))}
        wait_until(lambda: {transition(c["body"]) for c in receiver.refused()} >= expected_h1, timeout=120,
                   what="both hour-1 transitions to be refused by the receiver")
        receiver.status = 200
        wait_until(lambda: delivered() >= expected_h1, timeout=120, what="the hour-1 transitions, receiver up")
        # the deliveries acknowledged and committed: the kill below cannot send them again
        wait_until(lambda: committed_through(a.kafka_bootstrap, a.app_id, a.topics.alerts), timeout=60,
                   what="the alerts topic to be committed")

        # hour 2: nothing at all — web goes quiet, orders fire again. The receiver is down; a worker is
        # killed (-9) while the deliveries fail, and comes back; then the receiver does
        receiver.status = 503
        at(H2 + timedelta(hours=1, seconds=10))
        expected_h2 = {("web_quiet", "firing", iso(H2)), ("orders_low", "firing", iso(H2))}
        wait_until(lambda: {transition(c["body"]) for c in receiver.refused()} >= expected_h2, timeout=120,
                   what="both hour-2 transitions to be refused by the receiver")
        workers[0].kill()
        workers[0].start()
        receiver.status = 200
        wait_until(lambda: delivered() >= expected_h2, timeout=180, what="the hour-2 transitions after kill -9")
        # the day closes: conversion 5 of 12 and 12 daily users, from the aggregate's cells
        at(D0 + timedelta(days=1, seconds=10))
        expected_day = {("conversion_low", "firing", iso(D0)), ("few_daily_users", "firing", iso(D0))}
        wait_until(lambda: delivered() >= expected_day, timeout=120, what="the day's webhooks")
        expected = {("orders_low", "firing", iso(H0))} | expected_h1 | expected_h2 | expected_day
        wait_until(lambda: sum(w.scalar("SELECT count() FROM flywheel.alert_events FINAL") for w in workers)
                   >= len(expected), timeout=60, what="alert_events to hold every transition")
    finally:
        for w in workers:
            w.stop()
        receiver.server.shutdown()

    assert delivered() == expected
    assert all(c["signed"] for c in receiver.calls)
    keys: dict[tuple, set[str]] = {}
    for c in receiver.delivered():
        keys.setdefault(transition(c["body"]), set()).add(c["key"])
        assert c["key"] == c["body"]["idempotencyKey"] and c["body"]["text"].startswith((":rotating", ":white"))
    assert all(len(k) == 1 for k in keys.values()), keys  # one idempotency key per transition
    # two workers share every input, one evaluator per rule: one delivery each — also after the receiver
    # was down (hour 1). The hour-2 transitions were in flight through the kill -9: at least once
    counts: dict[tuple, int] = {}
    for c in receiver.delivered():
        counts[transition(c["body"])] = counts.get(transition(c["body"]), 0) + 1
    assert {t: n for t, n in counts.items() if t not in expected_h2} == {t: 1 for t in expected - expected_h2}

    with union_of(tmp_path / "union", workers) as union:
        stored = union.sql("SELECT alert, toString(state), formatDateTime(period, '%Y-%m-%dT%H:%i'), value, count,"
                           " late, superseded FROM flywheel.alert_events FINAL")
        assert {(r[0], r[1], r[2]) for r in stored} == expected
        assert not any(r[5] or r[6] for r in stored)  # judged on time, one at a time
        # each stored value is the oracle's, over every event both workers stored
        for name, _, period, value, count, _, _ in stored:
            alert = next(x for x in metrics.alerts if x.name == name)
            start = int(datetime.fromisoformat(period + ":00+00:00").timestamp() * 1000)
            end = start + alert.series.period_ms
            first = start - alert.series.period_ms
            rows = union.sql(alert_series_sql(alert, metrics, first, end))
            point = rules.history_points(alert, rows, first, end)[start]
            assert (round(value, 9), count) == (round(point.value, 9), point.count), (name, period)
    values = {(r[0], r[2]): r[3] for r in stored}
    assert values[("orders_low", iso(H0))] == 2 and values[("orders_low", iso(H1))] == 5
    assert values[("invalid_jump", iso(H1))] == 8 / 18 and values[("web_quiet", iso(H2))] == 0
    assert values[("conversion_low", iso(D0))] == 5 / 12 and values[("few_daily_users", iso(D0))] == 12
