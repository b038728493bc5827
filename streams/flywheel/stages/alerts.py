"""The alert stages (docs/design.md §10): each rule's evaluator on alerts.series, and webhook delivery on alerts.

Evaluation. alerts.series is keyed by rule name, so one partition — one worker — holds each rule: the
rule fires from the global value, once, however many workers share the series' inputs. Its records are
- shares: an input partition's value of a period (ingest counts, aggregate cells), absolute with a version;
  the newest share of every partition, summed, is the period's value (metrics/alerts.py `point`);
- progress: an input stage has handled every record of one of its partitions before a progress marker of
  time `through` (runtime/ticker.py). A stage's progress is the oldest over its partitions; a period is
  closed once that has passed its end plus the rule's grace — a quiet partition still moves (markers
  reach it too), an outage or a backlog holds periods open until the data behind them is in.

Per rule, in the `alerts` table (keys `s|<rule>`: shares of the periods not yet judged; `r|<rule>`: the
rule's state, the judged periods' points its baselines read, and transitions not yet published): each
batch updates the shares, judges every period that closed, in order (metrics/alerts.py), and writes the
table; the transitions are published to the `alerts` topic after their state is in Kafka, and kept with
it until then — a crash publishes them again at the partition's next start (same idempotency keys).

Transitions decided more than the rule's `late_after` after their period closed (a backlog, an outage)
are marked late; of several transitions of one rule decided together, all but the newest are marked
superseded: stored and published, not sent to webhooks — a backlog sends at most one per rule.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import orjson

from flywheel import observability as obs
from flywheel.config import Topics
from flywheel.metrics.alerts import (
    GAUGE,
    Point,
    RuleState,
    closable,
    evaluate,
    history_needed,
    newest_closed,
    point,
    stage_of,
    step,
    transition_record,
)
from flywheel.metrics.definitions import Alert, Metrics, Notify
from flywheel.model.clock import iso_ms, wall_ms
from flywheel.stages.ports import Outbox, Record, Table
from flywheel.stages.tables import Writes

log = logging.getLogger(__name__)

SHARES, RULE = b"s|", b"r|"


class AlertStage:
    def __init__(self, *, metrics: Metrics, table: Table, outbox: Callable[[], Awaitable[Outbox]], topics: Topics,
                 rule_partition: Callable[[str], int], clock: Callable[[], int] = wall_ms):
        self.alerts = {a.name: a for a in metrics.alerts}
        self.table = table
        self.outbox = outbox
        self.topics = topics
        self.rule_partition = rule_partition  # alerts.series partition of a rule (the partitioner's)
        self.clock = clock
        # evaluator partition → stage → input partition → through (in memory: markers come every tick)
        self.progress: dict[int, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
        self.inputs: dict[str, int] = {}  # stage → its input partitions
        self._started: set[int] = set()  # partitions whose stored unpublished transitions were taken up
        self._pending: dict[Alert, list[dict]] = {}  # transitions written, not yet published
        # rule → the progress at which its next period closes: below it, its state is not even read
        self._due: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def use(self, metrics: Metrics) -> None:
        """Another set of rules, while running: a rule whose version changed starts afresh (its stored state
        names the old version), one removed is no longer judged, one added starts (docs/design.md §13)."""
        async with self._lock:
            self.alerts = {a.name: a for a in metrics.alerts}
            self._due = {}

    def revoked(self, partitions: Sequence[int]) -> None:
        for q in partitions:
            self._started.discard(q)
            self.progress.pop(q, None)
        self._due = {name: due for name, due in self._due.items() if self.rule_partition(name) not in partitions}
        self._pending = {a: recs for a, recs in self._pending.items() if self.rule_partition(a.name) not in partitions}

    async def process(self, records: Sequence[Record]) -> None:
        async with self._lock:
            await self._run(records)

    async def _run(self, records: Sequence[Record]) -> None:
        outbox = await self.outbox()
        writes = Writes(self.table, outbox)
        shares: dict[Alert, dict[int, dict[str, dict[str, list]]]] = {}
        partitions = sorted({r.partition for r in records})
        for r in records:
            rec = orjson.loads(r.value)
            if rec["t"] == "progress":
                seen = self.progress[r.partition][rec["stage"]]
                seen[rec["partition"]] = max(seen.get(rec["partition"], rec["through"]), rec["through"])
                self.inputs[rec["stage"]] = rec["of"]
                continue
            alert = self.alerts.get(rec["rule"])
            if alert is None or rec["version"] != alert.version:
                continue  # a rule removed or changed since: its shares are not this rule's
            by_period, src, ver = self._shares(writes, r.partition, alert, shares), rec["src"], rec["ver"]
            for period, values in rec["periods"].items():
                share = by_period.setdefault(int(period), {}).setdefault(src, {})
                for role, value in values.items():
                    if role not in share or share[role][1] <= ver:
                        share[role] = [value, ver]
        pending: dict[Alert, list[dict]] = {}
        dues: dict[str, int] = {}  # taken only once the states they follow from are written
        for q in partitions:
            for alert in self.alerts.values():
                if self.rule_partition(alert.name) == q:
                    self._judge(q, alert, writes, shares, pending, dues)
        for alert, by_period in shares.items():
            key = SHARES + alert.name.encode()
            writes.put(self.rule_partition(alert.name), key, orjson.dumps(
                {"version": alert.version, "periods": {str(p): v for p, v in by_period.items()}}))
        writes.apply(await outbox.send())
        self._due.update(dues)
        self._pending.update(pending)
        for q in [q for q in partitions if q not in self._started]:  # a crash may have left some unpublished
            for key, value in self.table.scan(q, RULE):
                alert = self.alerts.get(key[len(RULE):].decode())
                data = orjson.loads(value)
                if alert is not None and data.get("pending") and alert not in self._pending:
                    self._pending[alert] = data["pending"]
            self._started.add(q)
        if self._pending:  # this batch's, and any a failed attempt left
            await self._publish(self._pending)
            self._pending = {}

    def _shares(self, writes: Writes, q: int, alert: Alert, shares: dict) -> dict[int, dict]:
        by_period = shares.get(alert)
        if by_period is None:
            raw = writes.get(q, SHARES + alert.name.encode())
            data = orjson.loads(raw) if raw is not None else {}
            stored = data.get("periods", {}) if data.get("version") == alert.version else {}
            by_period = shares[alert] = {int(p): v for p, v in stored.items()}
        return by_period

    def _judge(self, q: int, alert: Alert, writes: Writes, shares: dict, pending: dict[Alert, list[dict]],
               dues: dict[str, int]) -> None:
        """Every period of the rule closed since it was last judged, in order."""
        stage = stage_of(alert)
        seen, of = self.progress[q].get(stage, {}), self.inputs.get(stage)
        if of is None or any(p not in seen for p in range(of)):
            return  # not yet heard from every input partition (just started)
        complete = min(seen[p] for p in range(of))
        if complete < self._due.get(alert.name, complete):
            return  # its next period has not closed yet
        key = RULE + alert.name.encode()
        raw = writes.get(q, key)
        data = orjson.loads(raw) if raw is not None else {}
        if data.get("version") != alert.version:
            data = {}
        if not data:  # a new or changed rule judges the periods that close from now on
            start = newest_closed(alert, complete)
            writes.put(q, key, orjson.dumps({"version": alert.version, "history": {}, "pending": [],
                                             "state": RuleState(last=start).to_json()}))
            dues[alert.name] = self._next_close(alert, start)
            log.info("alert %s (version %s) starts: judges the %ss after the one from %s", alert.name,
                     alert.version, alert.series.period, iso_ms(start))
            return
        state = RuleState.from_json(data["state"])
        periods = closable(alert, state.last, complete)
        if not periods:
            dues[alert.name] = self._next_close(alert, state.last)
            return
        history = {int(p): Point(*v) for p, v in data.get("history", {}).items()}
        by_period = self._shares(writes, q, alert, shares)
        now = self.clock()
        decided = []
        gauge = alert.series.kind == "segment"  # its size when the period is judged
        for period in periods:
            history[period] = point(alert, by_period.get(GAUGE if gauge else period, {}))
            verdict = evaluate(alert, history, period)
            state, transition = step(alert, state, verdict)
            if transition is not None:
                late = now - (period + alert.series.period_ms + alert.grace_ms) > alert.late_after_ms
                decided.append(transition_record(alert, transition, verdict, state=state, decided_at=now, late=late))
        for rec in decided[:-1]:
            rec["superseded"] = True
        oldest = periods[-1] - history_needed(alert)
        for period in [p for p in by_period if p <= periods[-1] and not gauge]:
            del by_period[period]  # judged: a share coming later changes nothing
        unpublished = data.get("pending", []) + decided
        writes.put(q, key, orjson.dumps({
            "version": alert.version, "state": state.to_json(),
            "history": {str(p): [pt.value, pt.count] for p, pt in history.items() if p >= oldest},
            "pending": unpublished}))
        if unpublished:
            pending[alert] = unpublished
        dues[alert.name] = self._next_close(alert, periods[-1])
        for rec in decided:
            obs.ALERT_TRANSITIONS.labels(rec["state"]).inc()
            log.info("alert %s %s%s: %s for the %s from %s (baseline %s, bounds %s..%s)", alert.name, rec["state"],
                     " (late)" if rec["late"] else "", rec["value"], alert.series.period, rec["period"],
                     rec["baseline"], rec["lower"], rec["upper"])

    @staticmethod
    def _next_close(alert: Alert, last: int) -> int:
        """The progress at which the period after `last` closes (its end plus the grace)."""
        return last + 2 * alert.series.period_ms + alert.grace_ms

    async def _publish(self, pending: dict[Alert, list[dict]]) -> None:
        """Transitions to the alerts topic, then cleared from their rules' state."""
        out = await self.outbox()
        for alert, recs in pending.items():
            for rec in recs:
                out.add(self.topics.alerts, alert.name.encode(), orjson.dumps(rec))
        await out.send()
        out = await self.outbox()
        writes = Writes(self.table, out)
        for alert, recs in pending.items():
            q, key = self.rule_partition(alert.name), RULE + alert.name.encode()
            raw = writes.get(q, key)
            if raw is None:
                continue
            data = orjson.loads(raw)
            published = {r["idempotencyKey"] for r in recs}
            data["pending"] = [r for r in data.get("pending", []) if r["idempotencyKey"] not in published]
            writes.put(q, key, orjson.dumps(data))
        writes.apply(await out.send())


class NotifyStage:
    """Webhook delivery for the alerts topic: every transition not superseded, to each of its rule's
    webhooks, at least once. Every delivery of a batch is tried; the batch is acknowledged only once all
    succeeded, else it fails and the retry policy tries again after a back-off (what was delivered is not
    sent again by this worker; after a crash it may be — receivers dedupe on the idempotency key)."""

    def __init__(self, *, metrics: Metrics, post: Callable[[Notify, dict], Awaitable[None]]):
        self.alerts = {a.name: a for a in metrics.alerts}
        self.post = post
        self._delivered: set[tuple[str, str]] = set()  # (idempotency key, url)

    def use(self, metrics: Metrics) -> None:
        self.alerts = {a.name: a for a in metrics.alerts}

    async def process(self, records: Sequence[Record]) -> None:
        failed: Exception | None = None
        for r in records:
            rec = orjson.loads(r.value)
            alert = self.alerts.get(rec["alert"])
            if alert is None or rec.get("superseded"):
                continue
            for target in alert.notify:
                done = (rec["idempotencyKey"], target.webhook)
                if done in self._delivered:
                    continue
                try:  # every delivery is tried: one receiver down holds no other back within the batch
                    await self.post(target, rec)
                except Exception as exc:
                    failed = failed or exc
                    continue
                self._delivered.add(done)
                obs.ALERT_DELIVERIES.inc()
        if len(self._delivered) > 100_000:
            self._delivered.clear()
        if failed is not None:
            raise failed
