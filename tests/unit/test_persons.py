"""flywheel/persons.py: who a forget request is about, what it sends where, and what it deletes — on real
chdb with the real migrations. The stream's side: test_ingest.py, test_aggregate.py; all of it on a real
worker: tests/integration/test_persons_forget.py."""

from __future__ import annotations

import orjson
import pytest
from flywheel import paths, persons
from flywheel.clickhouse.embedded import EmbeddedClickHouse
from flywheel.clickhouse.migrate import apply
from flywheel.metrics.definitions import MAU, parse_metrics
from flywheel.model.clock import DAY_MS
from flywheel.model.rows import event_row, identity_rows, invalid_row
from flywheel.model.validate import dlq_record
from flywheel.runtime.partitioner import partition_for

DAY0 = 20_400
METRICS = parse_metrics({
    "lateness": "1d",
    "funnels": [{"name": "checkout", "window": "1h", "steps": [{"event": "Viewed"}, {"event": "Added"}]}],
    "retention": [{"name": "daily", "cohort_event": "any", "return_event": "any", "period": "day", "horizon": 3}],
})


def ev(mid: str, event: str, day: int, minute: int, *, anon: str = "", user: str = "", person: str,
       type_: str = "track", previous: str = "") -> dict:
    return event_row({"messageId": mid, "type": type_, "event": event, "anonymousId": anon, "userId": user,
                      "personId": person, "previousId": previous, "groupId": "",
                      "timestamp": (DAY0 + day) * DAY_MS + minute * 60_000, "receivedAt": 0, "properties": {},
                      "traits": {}, "context": {}, "source": "t"})


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    ch = EmbeddedClickHouse(tmp_path_factory.mktemp("chdb"))
    apply(ch, paths.sql_dir() / "migrations")
    ch.insert("flywheel.events", [
        ev("a1", "Viewed", 0, 10, anon="A", person="A"), ev("a2", "Added", 0, 15, anon="A", person="A"),
        ev("a3", "", 0, 20, anon="A", user="U", person="U", type_="identify"),
        ev("u1", "Viewed", 2, 10, anon="B", user="U", person="U"),  # B is someone else's (a refused link)
        ev("u2", "Viewed", 2, 30, user="U", person="U"),
        ev("al", "", 2, 40, previous="P", user="U", person="U", type_="alias"),
        ev("v1", "Viewed", 0, 10, user="V", person="V"),
        ev("o1", "Viewed", 1, 10, user="U_old", person="U_old"),  # before U_old was aliased to U
        ev("o2", "", 3, 0, previous="U_old", user="U", person="U", type_="alias"),
    ])
    for change in ({"type": "link", "anonymousId": "A", "userId": "U", "messageId": "a3", "timestamp": DAY0 * DAY_MS},
                   {"type": "link", "anonymousId": "P", "userId": "U", "messageId": "al", "timestamp": DAY0 * DAY_MS},
                   {"type": "link", "anonymousId": "B", "userId": "V", "messageId": "b", "timestamp": DAY0 * DAY_MS},
                   {"type": "link", "anonymousId": "U_old", "userId": "U", "messageId": "o2",
                    "timestamp": DAY0 * DAY_MS},
                   {"type": "conflict", "anonymousId": "B", "linkedTo": "V", "refused": "U", "messageId": "u1",
                    "timestamp": DAY0 * DAY_MS}):
        table, row = identity_rows(change)
        ch.insert(table, [row])
    ch.insert("flywheel.invalid_events", [
        invalid_row(dlq_record(b'{"type":"track","anonymousId":"A","event":"Bad"}', source="t", reasons=["x"],
                               received_ms=0, origin="raw/0@9")),
        invalid_row(dlq_record(b'{"type":"track","userId":"V","event":"Bad"}', source="t", reasons=["x"],
                               received_ms=0, origin="raw/0@10")),
    ])
    yield ch
    ch.close()


def rows(ch):
    return lambda sql: [list(r) for r in ch.rows(sql)[1]]


def test_an_id_names_its_person_with_every_id_event_and_cell_of_theirs(ch):
    person = persons.find(rows(ch), "A", METRICS)
    assert person.person_id == "U"
    # not B: V's, carried by a refused link; U_old: aliased to U, with events of its own
    assert person.ids == ["U", "A", "P", "U_old"]
    assert [(m, k) for m, k, _ in person.events] == [
        ("a1", "A"), ("a2", "A"), ("a3", "A"), ("al", "P"), ("o1", "U_old"), ("o2", "U_old"), ("u1", "B"),
        ("u2", "U")]
    f, daily = METRICS.funnels[0], METRICS.retention[0]
    # cells by the id ClickHouse resolves events to: that id's partition counted them
    assert set(person.cells) == {"U", "U_old"}
    u, old = set(person.cells["U"]), set(person.cells["U_old"])
    assert {c for c in u if c[0] is f} == {(f, DAY0, 1), (f, DAY0, 2), (f, DAY0 + 2, 1)}
    assert {c for c in u if c[0] is daily} == {(daily, DAY0, 0), (daily, DAY0, 2)}
    assert {c for c in u if c[0] is MAU} == {(MAU, d) for d in range(DAY0, DAY0 + 32)}  # active days 0 and 2
    assert {c for c in old if c[0] is not MAU and c[0].name not in ("dau", "wau")} == {
        (f, DAY0 + 1, 1), (daily, DAY0 + 1, 0)}
    assert persons.find(rows(ch), "nobody", METRICS) is None


def test_requests_go_where_the_state_is(ch):
    person = persons.find(rows(ch), "U", METRICS)
    parts = list(range(4))
    raw = {partition_for(k.encode(), parts): orjson.loads(v)
           for k, v in persons.raw_requests(person, "r", parts)}
    for i in ("A", "P"):  # a link lives on its anonymous id's partition
        assert i in raw[partition_for(i.encode(), parts)]["ids"]
    for mid, key, _ in person.events:  # a messageId on its event's key's partition
        assert mid in raw[partition_for(key.encode(), parts)]["messageIds"]
    assert sum(len(r["messageIds"]) for r in raw.values()) == 8
    assert [r for r in persons.raw_requests(person, "r", parts, since_ms=10**15)] == [  # all older: ids only
        (k, v) for k, v in persons.raw_requests(person, "r", parts, since_ms=10**15) if orjson.loads(v)["ids"]]
    identified = [orjson.loads(v) for _, v in persons.identified_requests(person, "r", 123)]
    assert [(r["person"], r.get("primary", False), len(r["cells"])) for r in identified] == [
        ("U", True, len(person.cells["U"])), ("A", False, 0), ("P", False, 0),
        ("U_old", False, len(person.cells["U_old"]))]
    assert identified[0]["at"] == 123 and identified[0]["ids"] == person.ids


def test_a_heavy_persons_messageids_are_split_over_several_requests():
    person = persons.Person("U", ["U"], [(f"m{i}", "U", 0) for i in range(2500)])
    requests = [orjson.loads(v) for _, v in persons.raw_requests(person, "r", [0, 1, 2])]
    assert [len(r["messageIds"]) for r in requests] == [1000, 1000, 500]


def test_the_deletions_leave_nothing_of_theirs_and_everything_else(ch):
    person = persons.find(rows(ch), "U", METRICS)
    assert persons.delete(rows(ch), person, wait=60) == []
    q = rows(ch)
    assert q("SELECT message_id FROM flywheel.events ORDER BY message_id") == [["v1"]]
    assert q("SELECT distinct_id, person_id FROM flywheel.identity_map") == [["B", "V"]]  # U_old's went too
    assert q("SELECT count() FROM flywheel.identity_conflicts") == [[0]]  # it named U
    assert q("SELECT origin FROM flywheel.invalid_events") == [["raw/0@10"]]
    assert persons.find(q, "U", METRICS) is None  # a second run finds nothing
