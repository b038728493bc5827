"""Identity on a real broker and embedded ClickHouse: one person across devices, sign-up and alias,
with history stitched; a conflicting identify does not move an anonymous id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from flywheel.producer import Producer
from helpers import WorkerProcess, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 10, 9, tzinfo=UTC)


def at(minutes: int) -> str:
    return (T0 + timedelta(minutes=minutes)).isoformat()


def test_devices_signup_and_alias_resolve_to_one_person(pipeline_settings):
    phone, laptop, tablet, user, other = "anon-phone", "anon-laptop", "anon-tablet", "user-42", "user-99"
    journey = [
        # Anonymous browsing on two devices, before anyone knows who it is.
        {"type": "page", "anonymousId": phone, "name": "Home", "timestamp": at(0)},
        {"type": "track", "anonymousId": phone, "event": "Product Viewed", "timestamp": at(1),
         "properties": {"product_id": "p1"}},
        {"type": "track", "anonymousId": laptop, "event": "Product Viewed", "timestamp": at(2),
         "properties": {"product_id": "p2"}},
        # Sign-up on the phone: identify links phone → user.
        {"type": "identify", "anonymousId": phone, "userId": user, "timestamp": at(3), "traits": {"plan": "pro"}},
        {"type": "track", "anonymousId": phone, "event": "Product Viewed", "timestamp": at(4),
         "properties": {"product_id": "p3"}},
        # Login on the laptop: an event carrying both ids links laptop → user.
        {"type": "track", "anonymousId": laptop, "userId": user, "event": "Signed In", "timestamp": at(5)},
        {"type": "track", "anonymousId": laptop, "event": "Product Added", "timestamp": at(6),
         "properties": {"product_id": "p2"}},
        # The tablet's history, then an alias from the backend.
        {"type": "track", "anonymousId": tablet, "event": "Product Viewed", "timestamp": at(7),
         "properties": {"product_id": "p4"}},
        {"type": "alias", "previousId": tablet, "userId": user, "timestamp": at(8)},
        # Someone else identifies on the phone: refused, the phone stays with user-42.
        {"type": "identify", "anonymousId": phone, "userId": other, "timestamp": at(9)},
        {"type": "track", "anonymousId": phone, "event": "Order Completed", "timestamp": at(10),
         "properties": {"order_id": "o1", "revenue": 10.0}},
    ]
    worker = WorkerProcess(pipeline_settings).start()
    try:
        with Producer(pipeline_settings.kafka_bootstrap, topic=pipeline_settings.topics.raw, source="test") as p:
            ids = [p.send(m) for m in journey]
        conflict_id = ids[9]
        wait_until(lambda: (worker.scalar("SELECT count() FROM flywheel.events FINAL"),
                            worker.scalar("SELECT count() FROM flywheel.identity_map FINAL"),
                            worker.scalar("SELECT count() FROM flywheel.identity_conflicts FINAL"))
                   == (len(journey), 3, 1), timeout=120, what="events, 3 links and 1 conflict")

        assert sorted(worker.sql("SELECT distinct_id, person_id FROM flywheel.identity_map FINAL")) == sorted(
            [[phone, user], [laptop, user], [tablet, user]])
        assert worker.sql("SELECT anonymous_id, linked_to, refused FROM flywheel.identity_conflicts") == [
            [phone, user, other]]

        resolved = dict(worker.sql("SELECT message_id, person_id FROM flywheel.events_resolved"))
        assert resolved[conflict_id] == other  # the refused call itself is still that user's event
        assert {mid: resolved[mid] for mid in ids if mid != conflict_id} == {
            mid: user for mid in ids if mid != conflict_id}
        # History is stitched, not rewritten: ingestion time knew only the anonymous id.
        at_ingestion = dict(worker.sql("SELECT message_id, person_id_at_ingestion FROM flywheel.events_resolved"))
        assert at_ingestion[ids[0]] == phone and at_ingestion[ids[7]] == tablet
        assert at_ingestion[ids[10]] == user  # after the link, the stream already knows
        assert worker.metric("flywheel_identity_links_total") == 3
        assert worker.metric("flywheel_identity_conflicts_total", source="test") == 1
    finally:
        worker.stop()


def test_junk_ids_never_become_persons(pipeline_settings):
    worker = WorkerProcess(pipeline_settings).start()
    try:
        with Producer(pipeline_settings.kafka_bootstrap, topic=pipeline_settings.topics.raw, source="test") as p:
            p.send({"type": "identify", "anonymousId": "anon-1", "userId": "undefined"})
            p.send({"type": "track", "anonymousId": "null", "event": "Viewed"})
            p.send({"type": "alias", "previousId": "0", "userId": "user-1"})
            p.send({"type": "track", "anonymousId": "anon-1", "event": "Viewed"})
        wait_until(lambda: worker.scalar("SELECT count() FROM flywheel.invalid_events FINAL") == 3
                   and worker.scalar("SELECT count() FROM flywheel.events FINAL") == 1,
                   timeout=120, what="3 DLQ rows and 1 event")
        assert worker.scalar("SELECT countIf(arrayExists(r -> r LIKE 'not a real id%', reasons)) "
                             "FROM flywheel.invalid_events") == 3
        assert worker.scalar("SELECT count() FROM flywheel.identity_map") == 0
        assert worker.sql("SELECT person_id FROM flywheel.events_resolved") == [["anon-1"]]
    finally:
        worker.stop()


def identify_burst(n_anon: int = 400, seed: int = 5) -> list[dict]:
    """Per anonymous id: browsing, an identify (two devices per user), more browsing; 10% later try to
    identify as someone else. Ids interleave at random; each id's own calls stay in order."""
    import random
    import uuid

    rng = random.Random(seed)
    per_anon = []
    for i in range(n_anon):
        anon, user = f"anon-{i}", f"user-{i // 2}"
        props = {"product_id": f"p{i}"}  # required by the shipped tracking plan
        calls = [{"type": "track", "anonymousId": anon, "event": "Product Viewed", "timestamp": at(j),
                  "properties": props} for j in range(3)]
        calls.append({"type": "identify", "anonymousId": anon, "userId": user, "timestamp": at(3)})
        calls += [{"type": "track", "anonymousId": anon, "event": "Product Added", "timestamp": at(4 + j),
                   "properties": props} for j in range(2)]
        if rng.random() < 0.1:
            calls.append({"type": "identify", "anonymousId": anon, "userId": f"user-x{i}", "timestamp": at(9)})
        for c in calls:
            c["messageId"] = str(uuid.UUID(int=rng.getrandbits(128)))
        per_anon.append(calls)
    out = []
    while any(per_anon):
        q = rng.choice([q for q in per_anon if q])
        out.append(q.pop(0))
    return out


def _counts(worker: WorkerProcess) -> tuple:
    return tuple(worker.scalar(f"SELECT count() FROM flywheel.{t} FINAL")
                 for t in ("events", "identity_map", "identity_conflicts", "invalid_events"))


def _identity_state(worker: WorkerProcess) -> tuple[set, set, set]:
    return (
        {tuple(r) for r in worker.sql("SELECT distinct_id, person_id FROM flywheel.identity_map FINAL")},
        {tuple(r) for r in worker.sql(
            "SELECT anonymous_id, linked_to, refused FROM flywheel.identity_conflicts FINAL")},
        {tuple(r) for r in worker.sql("SELECT message_id, person_id FROM flywheel.events_resolved")},
    )


def test_sigkill_during_a_burst_of_identifies_matches_an_uninterrupted_run(kafka, tmp_path):
    import threading

    from flywheel.model.identity import IdentityMap
    from helpers import unique_settings

    calls = identify_burst()
    model = IdentityMap()
    for c in calls:
        model.apply(c)
    expected_links = set(model.links.items())
    expected_conflicts = {(c.anonymous_id, c.linked_to, c.refused) for c in model.conflicts}

    def run(name: str, *, kill: bool) -> tuple[set, set, set]:
        settings = unique_settings(kafka, tmp_path / name)
        worker = WorkerProcess(settings).start()

        def send() -> None:
            with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="test") as p:
                for c in calls:
                    p.send(c)

        sender = threading.Thread(target=send)
        try:
            sender.start()
            if kill:
                wait_until(lambda: worker.scalar("SELECT count() FROM flywheel.identity_map") >= 60,
                           timeout=120, what="the first links", interval=0.2)
                worker.kill()
                sender.join()
                worker.start()
            sender.join()
            expected = (len(calls), len(expected_links), len(expected_conflicts))

            try:
                wait_until(lambda: _counts(worker)[:3] == expected, timeout=300,
                           what=f"{name}: {expected} events, links, conflicts")
            except AssertionError as exc:
                raise AssertionError(
                    f"{name}: expected {expected}, got {_counts(worker)}\n{worker.log_tail(30)}"
                ) from exc
            return _identity_state(worker)
        finally:
            sender.join()
            worker.stop()

    uninterrupted = run("uninterrupted", kill=False)
    killed = run("killed", kill=True)
    assert uninterrupted[0] == expected_links and uninterrupted[1] == expected_conflicts
    assert killed == uninterrupted
