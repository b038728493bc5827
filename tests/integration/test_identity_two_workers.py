"""Acceptance (issue #4): two workers give the same identity result as one.

One deterministic identity-heavy stream (devices, identifies, logins, aliases, conflicts, junk ids,
SDK retries) is produced to two pipelines on the real broker, each with its own topics (8
partitions), consumer group and stores: pipeline 1 runs one worker, pipeline 2 two workers of one
app id that split the partitions. Each worker of pipeline 2 sinks only its partitions into its own
embedded ClickHouse, so pipeline 2 is read as the union of its workers' stores (tests/union_store.py),
where the views run over all the rows. identity_map, identity_conflicts, events_resolved (and the
whole events table) must be equal between the pipelines and equal to the pure model
(flywheel.identity.IdentityMap over the validated stream, in send order).

Before any event is sent, every worker must be in its group with every partition of events.raw and
of each table changelog owned: this test found a start-up race that left a table's changelog
unassigned, so that table's writes failed and their events were lost (now fixed on main; see
test_worker_topics.py). The check keeps such a failure fast and named.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from events_gen import identity_stream
from flywheel.model.envelope import Limits, kafka_key
from flywheel.model.identity import IdentityMap
from flywheel.model.plan import load_plan
from flywheel.model.validate import Invalid, Raw, validate
from flywheel.producer import Producer
from helpers import WorkerProcess, free_port, settled, unique_settings, wait_until
from union_store import UnionStore, union_of

pytestmark = pytest.mark.integration

PARTITIONS = 8
# Stamped as receivedAt on every record (after every event time: no clock-skew or future verdicts),
# so both pipelines store identical rows.
RECEIVED_AT = datetime(2026, 11, 20, tzinfo=UTC)


@dataclass
class Oracle:
    """What the pipeline must produce, from the pure stages in send order."""

    records: list[tuple[str | None, bytes]] = field(default_factory=list)  # (Kafka key, value) to send
    person_at_ingestion: dict[str, str] = field(default_factory=dict)  # messageId → person when ingested
    person_now: dict[str, str] = field(default_factory=dict)  # messageId → person after all links
    links: dict[str, str] = field(default_factory=dict)
    conflicts: list[tuple[str, str, str, str]] = field(default_factory=list)  # anon, linked_to, refused, messageId
    invalid: list[tuple[int, bytes]] = field(default_factory=list)  # (record index, value)
    retries: int = 0

    @classmethod
    def of(cls, messages: list[dict]) -> Oracle:
        plan = load_plan(Path(__file__).resolve().parents[2] / "schemas" / "tracking_plan.yaml")
        oracle = cls()
        model = IdentityMap()
        accepted: list[dict] = []
        for i, message in enumerate(messages):
            value = orjson.dumps(message)
            oracle.records.append((kafka_key(message), value))
            outcome = validate(Raw(value=value, source="test", received_at=RECEIVED_AT), plan, Limits())
            if isinstance(outcome, Invalid):
                oracle.invalid.append((i, value))
                continue
            ev = outcome.event
            mid = ev["messageId"]
            if mid in oracle.person_at_ingestion:
                oracle.retries += 1
                continue
            result = model.apply(ev)
            oracle.person_at_ingestion[mid] = result.person_id
            if result.conflict is not None:
                c = result.conflict
                oracle.conflicts.append((c.anonymous_id, c.linked_to, c.refused, mid))
            accepted.append(ev)
        # Today's person, as events_resolved computes it: once every link is known.
        oracle.person_now = {ev["messageId"]: ev["userId"] or model.person_of(ev["anonymousId"] or ev["previousId"])
                             for ev in accepted}
        oracle.links = dict(model.links)
        return oracle

    @property
    def expected_counts(self) -> tuple[int, int, int, int]:
        return len(self.person_at_ingestion), len(self.links), len(self.conflicts), len(self.invalid)


def send(settings, records: list[tuple[str | None, bytes]]) -> None:
    with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="test") as producer:
        for key, value in records:
            producer.send_raw(value, key=key, received_at=RECEIVED_AT)


def sunk(workers: list[WorkerProcess]) -> tuple[tuple[int, int, int, int], list[tuple[int, int, int, int]]]:
    """(distinct message ids, linked ids, conflicts, invalid records) over the workers' stores together,
    and each worker's own row counts."""
    queries = (
        "SELECT DISTINCT message_id FROM flywheel.events",
        "SELECT DISTINCT distinct_id FROM flywheel.identity_map",
        "SELECT DISTINCT anonymous_id, message_id FROM flywheel.identity_conflicts",
        "SELECT DISTINCT origin FROM flywheel.invalid_events",
    )
    together: list[set] = [set() for _ in queries]
    own = []
    for worker in workers:
        counts = []
        for i, sql in enumerate(queries):
            rows = {tuple(r) for r in worker.sql(sql)}
            together[i] |= rows
            counts.append(len(rows))
        own.append(tuple(counts))
    return tuple(len(s) for s in together), own


def assert_tables_are_owned(assignment: dict[str, list[list[int]]], settings, log_tail: str) -> None:
    """Every partition of every table changelog is assigned in the group: else a table write fails.

    Found by this test: when Faust created a changelog topic at worker start-up just before joining
    the group and the consumer's metadata did not have it yet, the assignor logged "Ignoring missing
    topic" and no worker owned that changelog until a metadata refresh (5 min) rebalanced. Meanwhile
    every write to the table raised PartitionsMismatch, the ingest agent crashed on that event and
    was restarted past it: the event was lost. (main now creates the changelogs up front.)"""
    partitions = list(range(settings.partitions))
    missing = {t: sorted(set(partitions) - {p for ps in owners for p in ps})
               for t, owners in assignment.items() if t.endswith("-changelog")}
    missing = {t: ps for t, ps in missing.items() if ps}
    assert len(assignment) >= 3 and not missing, (
        f"{settings.app_id}: table changelog partitions no worker owns: {missing} (assignment {assignment}); "
        f"writes to those tables fail and their events are lost\n{log_tail}")


def state(store: UnionStore) -> dict[str, list]:
    """Everything the comparison looks at, as sorted lists (duplicates would show)."""
    def rows(sql: str) -> list:
        return sorted(tuple(r) for r in store.sql(sql))

    invalid = [(origin.rsplit("/", 1)[1].split("@")[0], payload, tuple(reasons)) for origin, payload, reasons
               in store.sql("SELECT origin, payload, reasons FROM flywheel.invalid_events FINAL")]
    return {
        # As the view reads it (argMin by version), and how many persons each id was ever linked to.
        "identity_map": rows("SELECT distinct_id, argMin(person_id, version), uniqExact(person_id) "
                             "FROM flywheel.identity_map GROUP BY distinct_id"),
        "identity_conflicts": rows("SELECT anonymous_id, linked_to, refused, message_id "
                                   "FROM flywheel.identity_conflicts FINAL"),
        "events_resolved": rows("SELECT message_id, person_id, person_id_at_ingestion FROM flywheel.events_resolved"),
        "events": sorted(orjson.dumps(r).decode() for r in store.sql(
            "SELECT * EXCEPT inserted_at FROM flywheel.events FINAL")),
        "invalid_events": sorted(invalid),
    }


def diff(name: str, a: list, b: list, limit: int = 8) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return (f"{name}: {len(a)} vs {len(b)} rows; only in the first {len(only_a)}: {only_a[:limit]}; "
            f"only in the second {len(only_b)}: {only_b[:limit]}")


def assert_matches_model(name: str, got: dict[str, list], oracle: Oracle) -> None:
    links = sorted((anon, user, 1) for anon, user in oracle.links.items())
    resolved = sorted((mid, oracle.person_now[mid], oracle.person_at_ingestion[mid])
                      for mid in oracle.person_at_ingestion)
    problems = [diff(f"{table} vs the model", got[table], want) for table, want in (
        ("identity_map", links), ("identity_conflicts", sorted(oracle.conflicts)), ("events_resolved", resolved),
    ) if got[table] != want]
    assert not problems, f"{name}:\n" + "\n".join(problems)
    assert len(got["events"]) == len(oracle.person_at_ingestion), name
    assert len(got["invalid_events"]) == len(oracle.invalid), name
    assert all(any(r.startswith("not a real id") for r in reasons) for _, _, reasons in got["invalid_events"]), name


def assert_same(first: dict[str, list], second: dict[str, list], what: str) -> None:
    problems = [diff(name, first[name], second[name]) for name in first if first[name] != second[name]]
    assert not problems, f"{what} differ:\n" + "\n".join(problems)


@pytest.mark.timeout(1200)
def test_two_workers_give_the_same_identity_as_one(kafka, tmp_path):
    oracle = Oracle.of(identity_stream())
    expected = oracle.expected_counts
    assert oracle.retries > 0 and oracle.conflicts and oracle.invalid and len(oracle.links) > 300  # the mix is there

    one = unique_settings(kafka, tmp_path / "one", partitions=PARTITIONS)
    two_a = unique_settings(kafka, tmp_path / "two-a", partitions=PARTITIONS)
    two_b = two_a.model_copy(update={"data_dir": tmp_path / "two-b", "http_port": free_port(),
                                 "admin_port": free_port()})
    single, first, second = (WorkerProcess(s) for s in (one, two_a, two_b))
    pipeline_1, pipeline_2 = [single], [first, second]
    workers = pipeline_1 + pipeline_2
    try:
        for worker in workers:
            worker.start(wait_ready=False)
        for worker in workers:
            worker.wait_ready(timeout=300)
        # Both workers of pipeline 2 own partitions before any event exists: no rebalance moves work
        # from one to the other while the stream is processed. And every table changelog is owned.
        assignments = {}
        for name, settings, pipeline in (("pipeline 1", one, pipeline_1), ("pipeline 2", two_a, pipeline_2)):
            assignments[name] = wait_until(
                functools.partial(settled, kafka, settings, len(pipeline)), timeout=180,
                what=f"{name}'s {len(pipeline)} worker(s) to own the partitions of events.raw")
            log_tail = "\n".join(w.log_tail(40) for w in pipeline)
            assert_tables_are_owned(assignments[name], settings, log_tail)
        assignment = assignments["pipeline 2"][two_a.topics.raw]

        send(one, oracle.records)
        send(two_a, oracle.records)

        for name, pipeline in (("pipeline 1", pipeline_1), ("pipeline 2", pipeline_2)):
            try:
                wait_until(lambda p=pipeline: sunk(p)[0] == expected, timeout=300, interval=2,
                           what=f"{name} to sink {expected} (events, links, conflicts, invalid)")
            except AssertionError as exc:
                logs = "\n".join(f"--- {w.log_path}\n{w.log_tail(25)}" for w in pipeline)
                raise AssertionError(f"{exc}\nnow: {sunk(pipeline)}\n{logs}") from None

        # Pipeline 2's workers both did the work of their partitions: validate, dedup, identity, sink.
        own = sunk(pipeline_2)[1]
        for worker, (events, links, _, _) in zip(pipeline_2, own, strict=True):
            assert events > 0 and links > 0, f"{worker.settings.data_dir}: {own} (assignment {assignment})"
            assert worker.metric("flywheel_events_received_total", source="test") > 0
            assert worker.metric("flywheel_identity_links_total") > 0
        # (More than once only if a record was redelivered after a rebalance.)
        assert sum(w.metric("flywheel_events_received_total", source="test") for w in pipeline_2) >= len(
            oracle.records)
        assert single.metric("flywheel_events_received_total", source="test") >= len(oracle.records)

        # The union read from the running workers (through /sql) ...
        with union_of(tmp_path / "union-2-running", pipeline_2) as union:
            while_running = state(union)
    finally:
        for worker in workers:
            worker.stop()

    # ... equals the union read from their stopped stores: nothing moved after the counts were reached.
    with union_of(tmp_path / "union-2", pipeline_2) as union:
        two_workers = state(union)
        copied = union.copied
    assert_same(while_running, two_workers, "pipeline 2 read while running and read when stopped")
    assert all(c["events"] > 0 and c["identity_map"] > 0 for c in copied), copied
    with union_of(tmp_path / "union-1", pipeline_1) as union:
        one_worker = state(union)

    # Each is what the pure model says ...
    for name, got in (("one worker", one_worker), ("two workers", two_workers)):
        assert_matches_model(name, got, oracle)
    # ... and they are equal in everything else too: every column of every event, the DLQ.
    assert_same(one_worker, two_workers, "one worker and two workers")
