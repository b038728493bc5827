"""stages/alerts.py over an in-memory Kafka and table, and web/webhooks.py against a real local HTTP server:
shares summed over input partitions, periods closed only by every partition's progress, transitions
published after their state and again after a crash, backlogs marked late and superseded, and webhook
delivery (allowlist, signature, retries) — at least once, one idempotency key per transition. On a real
broker with real kills: tests/integration/test_alerts_stream.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
import pytest
from aiohttp import web
from flywheel.config import Topics
from flywheel.metrics.alerts import FIRING, RESOLVED, feed_record, progress_record
from flywheel.metrics.definitions import parse_metrics
from flywheel.stages.alerts import RULE, AlertStage, NotifyStage
from flywheel.stages.tables import MemoryTable
from flywheel.web import webhooks
from helpers import MemoryKafka, free_port

HOUR = 3_600_000
P0 = 20_000 * 86_400_000  # an hour's start
TOPICS = Topics()
CHANGELOG = "alerts-changelog"
METRICS = parse_metrics({"alerts": [
    {"name": "orders_low", "series": {"events": "Order Completed", "period": "hour"},
     "rule": {"threshold": {"below": 10}}, "grace": "1m", "late_after": "30m",
     "notify": [{"webhook": "http://127.0.0.1:1/hook"}]},
]})
ORDERS = METRICS.alerts[0]


@dataclass
class Rec:
    partition: int
    value: bytes
    offset: int = 0
    key: bytes | None = None
    topic: str = TOPICS.alert_series
    headers: tuple = ()
    timestamp: float = 0.0


def share(period: int, src: str, ver: int, v: int) -> Rec:
    return Rec(0, orjson.dumps(feed_record(ORDERS, src, ver, {period: {"v": v}})))


def progress(partition: int, through: int, of: int = 2) -> Rec:
    return Rec(0, orjson.dumps(progress_record("ingest", partition, of, through)))


def restored(kafka: MemoryKafka) -> MemoryTable:
    table = MemoryTable(CHANGELOG)
    for p, k, v in kafka.log[CHANGELOG]:
        table.write(p, {k: v}, None)
    return table


def stage(kafka: MemoryKafka, table: MemoryTable, now: int) -> AlertStage:
    return AlertStage(metrics=METRICS, table=table, outbox=kafka.outbox, topics=TOPICS, rule_partition=lambda _: 0,
                      clock=lambda: now)


def published(kafka: MemoryKafka) -> list[dict]:
    return kafka.cells(TOPICS.alerts)


def closed(period: int) -> int:
    return period + HOUR + 60_000  # end plus the grace


def start() -> list[Rec]:
    """Progress before P0's close: the rule starts, P0 is the first hour it judges."""
    return [progress(0, closed(P0 - HOUR)), progress(1, closed(P0 - HOUR))]


def test_shares_are_summed_and_a_period_waits_for_every_partition():
    kafka = MemoryKafka(partitions=1)
    s = stage(kafka, restored(kafka), now=closed(P0))

    async def go():
        await s.process(start())
        # newest share per input partition wins, whatever the order of arrival
        await s.process([share(P0, "i0", 5, 3), share(P0, "i1", 9, 4), share(P0, "i1", 7, 40)])
        await s.process([progress(0, closed(P0))])
        assert published(kafka) == []  # partition 1 has not reported: the period may be incomplete
        await s.process([progress(1, closed(P0) - 1)])
        assert published(kafka) == []  # … and not far enough
        await s.process([progress(1, closed(P0))])
    asyncio.run(go())
    (rec,) = published(kafka)
    assert (rec["state"], rec["value"], rec["late"]) == (FIRING, 7, False)


def test_transitions_go_in_order_then_stop():
    kafka = MemoryKafka(partitions=1)
    s = stage(kafka, restored(kafka), now=closed(P0 + HOUR))

    async def go():
        await s.process(start())
        await s.process([share(P0, "i0", 1, 3), progress(0, closed(P0)), progress(1, closed(P0))])
        # a share for a judged period changes nothing any more
        await s.process([share(P0, "i0", 2, 30), share(P0 + HOUR, "i0", 3, 25)])
        await s.process([progress(0, closed(P0 + HOUR)), progress(1, closed(P0 + HOUR))])
        await s.process([progress(0, closed(P0 + HOUR) + 5), progress(1, closed(P0 + HOUR) + 5)])
    asyncio.run(go())
    assert [(r["state"], r["value"]) for r in published(kafka)] == [(FIRING, 3), (RESOLVED, 25)]
    keys = [r["idempotencyKey"] for r in published(kafka)]
    assert len(set(keys)) == 2


def test_a_quiet_hour_is_a_zero():
    kafka = MemoryKafka(partitions=1)
    s = stage(kafka, restored(kafka), now=closed(P0))
    asyncio.run(s.process(start()))
    asyncio.run(s.process([progress(0, closed(P0)), progress(1, closed(P0))]))
    (rec,) = published(kafka)
    assert (rec["state"], rec["value"]) == (FIRING, 0)


def test_a_crash_before_publication_publishes_again_with_the_same_key():
    kafka = MemoryKafka(partitions=1)
    s = stage(kafka, restored(kafka), now=closed(P0))
    asyncio.run(s.process(start()))
    kafka.fail_on = {TOPICS.alerts}
    with pytest.raises(ConnectionError):
        asyncio.run(s.process([share(P0, "i0", 1, 2), progress(0, closed(P0)), progress(1, closed(P0))]))
    assert published(kafka) == []
    pending = orjson.loads(restored(kafka).get(0, RULE + b"orders_low"))["pending"]
    assert [r["state"] for r in pending] == [FIRING]  # the state and its transition are in the changelog
    kafka.fail_on = set()
    again = stage(kafka, restored(kafka), now=closed(P0) + 10)  # a new worker, the table from the changelog

    async def go():
        await again.process([progress(0, closed(P0) + 5), progress(1, closed(P0) + 5)])
        await again.process([progress(0, closed(P0) + 9), progress(1, closed(P0) + 9)])
    asyncio.run(go())
    (rec,) = published(kafka)
    assert rec["idempotencyKey"] == pending[0]["idempotencyKey"]
    assert orjson.loads(restored(kafka).get(0, RULE + b"orders_low"))["pending"] == []


def test_a_backlog_marks_transitions_late_and_superseded():
    kafka = MemoryKafka(partitions=1)
    periods = [P0 + i * HOUR for i in range(4)]
    s = stage(kafka, restored(kafka), now=closed(periods[-1]) + 2 * HOUR)  # judged two hours after the last close

    async def go():
        await s.process(start())
        values = [20, 3, 30, 4]  # clear, breach, clear, breach
        await s.process([share(p, "i0", i + 1, v) for i, (p, v) in enumerate(zip(periods, values, strict=True))])
        await s.process([progress(0, closed(periods[-1])), progress(1, closed(periods[-1]))])
    asyncio.run(go())
    recs = published(kafka)
    assert [(r["state"], r["value"], r["late"], r.get("superseded", False)) for r in recs] == [
        (FIRING, 3, True, True), (RESOLVED, 30, True, True), (FIRING, 4, True, False)]


def test_only_the_rules_partition_judges_it():
    kafka = MemoryKafka(partitions=2)
    s = AlertStage(metrics=METRICS, table=restored(kafka), outbox=kafka.outbox, topics=TOPICS,
                   rule_partition=lambda _: 1, clock=lambda: closed(P0))
    recs = [*start(), progress(0, closed(P0)), progress(1, closed(P0))]
    for r in recs:
        asyncio.run(s.process([r]))  # records of partition 0: another partition's rule
    assert published(kafka) == [] and kafka.log[CHANGELOG] == []
    for r in recs:
        r.partition = 1
        asyncio.run(s.process([r]))
    assert len(published(kafka)) == 1


def test_a_changed_rule_starts_afresh_and_ignores_old_shares():
    kafka = MemoryKafka(partitions=1)
    first = stage(kafka, restored(kafka), now=closed(P0))
    asyncio.run(first.process(start()))
    asyncio.run(first.process([share(P0, "i0", 1, 2), progress(0, closed(P0)), progress(1, closed(P0))]))
    changed = parse_metrics({"alerts": [{**{"name": "orders_low", "series": {"events": "Order Completed"}},
                                         "rule": {"threshold": {"below": 1}}}]})
    assert changed.alerts[0].version != ORDERS.version
    s = AlertStage(metrics=changed, table=restored(kafka), outbox=kafka.outbox, topics=TOPICS,
                   rule_partition=lambda _: 0, clock=lambda: closed(P0 + 2 * HOUR))
    asyncio.run(s.process([progress(0, closed(P0 + HOUR)), progress(1, closed(P0 + HOUR))]))  # starts afresh
    assert [r["state"] for r in published(kafka)] == [FIRING]  # the old rule's, on 2 orders
    asyncio.run(s.process([share(P0 + 2 * HOUR, "i0", 2, 5),  # the old version's share: not this rule's
                           progress(0, closed(P0 + 2 * HOUR)), progress(1, closed(P0 + 2 * HOUR))]))
    after = [(r["state"], r["value"], r["version"]) for r in published(kafka)][1:]
    assert after == [(FIRING, 0, changed.alerts[0].version)]


# ---- webhooks ---------------------------------------------------------------------------------------

def test_allowlist():
    allow = ["http://127.0.0.1:9999/hooks/", "https://hooks.slack.com/services/"]
    assert webhooks.allowed("http://127.0.0.1:9999/hooks/a", allow)
    assert webhooks.allowed("https://HOOKS.slack.com:443/services/T0/B0", allow)
    for url in ["http://127.0.0.1:9998/hooks/a", "http://127.0.0.1:9999/other", "https://127.0.0.1:9999/hooks/",
                "https://hooks.slack.com.evil.example/services/", "http://user@127.0.0.1:9999/hooks/a",
                "file:///etc/passwd", "http://127.0.0.1:9999"]:
        assert not webhooks.allowed(url, allow), url


def test_worker_config_problems_are_named():
    m = parse_metrics({"alerts": [{"name": "a", "series": {"events": "any"}, "rule": {"threshold": {"above": 1}},
                                   "notify": [{"webhook": "http://10.0.0.1/x", "secret_env": "NOPE_SECRET"}]}]})
    wrong = webhooks.problems(m.alerts, "http://127.0.0.1:1/", env={})
    assert wrong == ["alert a: webhook http://10.0.0.1/x is not allowed by FLYWHEEL_ALERT_WEBHOOKS "
                     "(http://127.0.0.1:1/): add its prefix there",
                     "alert a: the webhook secret's variable NOPE_SECRET is not set"]


def test_signature_covers_the_timestamp():
    body = b'{"alert":"a"}'
    header = webhooks.signature("s3cret", 1_700_000_000, body)
    assert webhooks.verify("s3cret", header, body, now=1_700_000_100)
    assert not webhooks.verify("s3cret", header, body + b" ", now=1_700_000_100)
    assert not webhooks.verify("other", header, body, now=1_700_000_100)
    assert not webhooks.verify("s3cret", header, body, now=1_700_000_000 + 3600)  # a replay, an hour later
    forged = header.replace("t=1700000000", "t=1700003600")  # a fresh timestamp on the old MAC
    assert not webhooks.verify("s3cret", forged, body, now=1_700_003_600)


def test_delivery_through_a_real_http_server(monkeypatch):
    """The receiver is down (500) at first: the batch fails, nothing is lost; once it answers, each
    transition arrives signed, with its idempotency key; a superseded one is not sent."""
    port = free_port()
    m = parse_metrics({"alerts": [{"name": "orders_low", "series": {"events": "Order Completed"},
                                   "rule": {"threshold": {"below": 10}},
                                   "notify": [{"webhook": f"http://127.0.0.1:{port}/hook", "secret_env": "HOOK_KEY",
                                               "slack": True}]}]})
    hooks = webhooks.Webhooks(f"http://127.0.0.1:{port}/", env={"HOOK_KEY": "k3y"})
    notify = NotifyStage(metrics=m, post=hooks.post)
    received: list[tuple[dict, dict, int]] = []
    answers = [500]

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        assert webhooks.verify("k3y", request.headers[webhooks.SIGNATURE], body)
        status = answers.pop(0) if answers else 200
        received.append((dict(request.headers), orjson.loads(body), status))
        return web.Response(status=status)

    def transition(state: str, key: str, **more) -> Rec:
        return Rec(0, orjson.dumps({"alert": "orders_low", "state": state, "idempotencyKey": key, "value": 3.0,
                                    "period": "2024-10-04T10:00:00.000Z", "series": {"period": "hour"},
                                    "lower": 10, **more}), topic=TOPICS.alerts)

    async def go():
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            batch = [transition(FIRING, "k1", superseded=True), transition(RESOLVED, "k2"), transition(FIRING, "k3")]
            with pytest.raises(webhooks.WebhookError, match="answered 500"):
                await notify.process(batch)
            await notify.process(batch)  # the retry
        finally:
            await hooks.close()
            await runner.cleanup()
    asyncio.run(go())
    keys = [h[webhooks.IDEMPOTENCY] for h, _, _ in received]
    assert keys == ["k2", "k3", "k2"]  # k2 refused, k3 delivered all the same; the retry delivers k2 only
    assert [status for _, _, status in received] == [500, 200, 200]
    assert received[1][1]["text"].startswith(":rotating_light: orders_low firing: 3")  # k3
    assert received[2][1]["text"].startswith(":white_check_mark: orders_low resolved: 3")  # k2


def test_a_failed_publication_is_made_good_by_the_next_attempt():
    kafka = MemoryKafka(partitions=1)
    s = stage(kafka, restored(kafka), now=closed(P0))
    asyncio.run(s.process(start()))
    kafka.fail_on = {TOPICS.alerts}  # Kafka refuses the alerts topic for one attempt, well after the start
    batch = [share(P0, "i0", 1, 2), progress(0, closed(P0)), progress(1, closed(P0))]
    with pytest.raises(ConnectionError):
        asyncio.run(s.process(batch))
    kafka.fail_on = set()
    asyncio.run(s.process(batch))  # the retry: nothing left to judge, the transition still goes out
    assert [r["state"] for r in published(kafka)] == [FIRING]
    assert orjson.loads(restored(kafka).get(0, RULE + b"orders_low"))["pending"] == []


def test_a_batch_whose_state_did_not_land_is_judged_again():
    kafka = MemoryKafka(partitions=1)
    s = stage(kafka, restored(kafka), now=closed(P0))
    asyncio.run(s.process(start()))
    batch = [share(P0, "i0", 1, 2), progress(0, closed(P0)), progress(1, closed(P0))]
    kafka.fail_on = {CHANGELOG}  # the judged state does not reach Kafka
    with pytest.raises(ConnectionError):
        asyncio.run(s.process(batch))
    kafka.fail_on = set()
    asyncio.run(s.process(batch))  # the retry judges the hour again
    assert [(r["state"], r["value"]) for r in published(kafka)] == [(FIRING, 2)]
