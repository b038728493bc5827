"""flywheel/dlq.py: which rejected events a replay picks (on real chdb), and how `--since` reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from flywheel import dlq, paths
from flywheel.clickhouse.embedded import EmbeddedClickHouse
from flywheel.clickhouse.migrate import apply
from flywheel.model.rows import invalid_row
from flywheel.model.validate import dlq_record

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
MS = int(T0.timestamp() * 1000)


def rejected(origin: str, *, minutes: int, source: str = "web", reasons=("event 'Signed Up' is not in the "
             "tracking plan",), payload: bytes = b'{"type":"track"}', replay_of: str = "") -> dict:
    return invalid_row(dlq_record(payload, source=source, reasons=list(reasons), received_ms=MS + minutes * 60_000,
                                  origin=origin, replay_of=replay_of))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    ch = EmbeddedClickHouse(tmp_path_factory.mktemp("chdb"))
    apply(ch, paths.sql_dir() / "migrations")
    ch.insert("flywheel.invalid_events", [
        rejected("raw/0@1", minutes=0),
        rejected("raw/0@2", minutes=10, source="ios", reasons=["property 'plan' must be string, got integer"]),
        rejected("raw/1@5", minutes=20, payload=b"\xff\xfe not utf-8"),
        rejected("raw/1@9", minutes=30, replay_of="raw/0@1"),  # a replay of raw/0@1, rejected again
        rejected("sink:flywheel.events:m1", minutes=40, source="sink"),  # a row ClickHouse refused
        rejected("raw/0@1", minutes=0),  # the same record sunk twice (a redelivery): FINAL keeps one
    ])
    yield lambda sql: [list(r) for r in ch.rows(sql)[1]]
    ch.close()


def origins(picked: list[dlq.Rejected]) -> list[str]:
    return [r.origin for r in picked]


def test_originals_only_oldest_first_with_their_bytes(rows):
    picked = dlq.select(rows)
    assert origins(picked) == ["raw/0@1", "raw/0@2", "raw/1@5"]
    assert picked[2].payload == b"\xff\xfe not utf-8"  # base64 in the table, the original bytes again
    assert picked[0].received_ms == MS and picked[0].source == "web"


def test_filters_by_time_reason_source_and_limit(rows):
    assert origins(dlq.select(rows, since=T0 + timedelta(minutes=10))) == ["raw/0@2", "raw/1@5"]
    assert origins(dlq.select(rows, until=T0 + timedelta(minutes=10))) == ["raw/0@1"]
    assert origins(dlq.select(rows, reason="MUST BE STRING")) == ["raw/0@2"]
    assert origins(dlq.select(rows, source="web")) == ["raw/0@1", "raw/1@5"]
    assert origins(dlq.select(rows, source="it's")) == []  # quoted, not injected
    assert origins(dlq.select(rows, limit=2)) == ["raw/0@1", "raw/0@2"]


def test_when_reads_a_time_or_a_duration_back_from_now():
    assert dlq.when("2h", now=T0) == T0 - timedelta(hours=2)
    assert dlq.when("2026-11-29T10:00", now=T0) == datetime(2026, 11, 29, 10, tzinfo=UTC)
    assert dlq.when("2026-11-29T10:00+01:00", now=T0) == datetime(2026, 11, 29, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a time"):
        dlq.when("yesterday", now=T0)


def test_a_dry_run_says_how_many_from_where_and_why(rows):
    lines = dlq.summary(dlq.select(rows))
    assert lines[0].startswith("3 rejected events received 2026-11-30 08:00:00")
    assert lines[1] == "by source: web 2, ios 1"
    assert any("must be string" in line for line in lines[3:])
    assert dlq.summary([]) == ["no rejected events match"]
