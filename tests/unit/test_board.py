"""web/board.py: the UI's numbers are the ClickHouse views' numbers, whichever way the records arrive.

The oracle is the views themselves on real (embedded) ClickHouse: every record is inserted into its
*_partials table (cells.row, as the sink does); the board sees a snapshot of a prefix of them (read back
with board.snapshot_sql) and then all of them again from "Kafka", shuffled — the overlap a real UI has
between its snapshot and its consumer. Page functions must equal the views cell by cell.
"""

from __future__ import annotations

import random
import time
from datetime import date, timedelta

import orjson
import pytest
from flywheel.metrics.cells import KIND_BY_NAME, row
from flywheel.metrics.definitions import parse_metrics
from flywheel.metrics.results import from_stats, stats_sql
from flywheel.web import board
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

METRICS = parse_metrics({
    "funnels": [{"name": "checkout", "window": "6h",
                 "steps": [{"event": "Viewed"}, {"event": "Added"}, {"event": "Bought"}]},
                {"name": "signup", "window": "1d", "steps": [{"event": "Visited"}, {"event": "Signed Up"}]}],
    "retention": [{"name": "daily", "period": "day", "horizon": 5},
                  {"name": "weekly", "cohort_event": "Signed Up", "period": "week", "horizon": 3}],
    "experiments": [{"name": "button", "exposure": {"experiment_id": "button"},
                     "variations": {"control": 0.5, "green": 0.5}, "control": "control",
                     "metrics": [{"name": "bought", "conversion": {"event": "Bought", "within": "7d"}},
                                 {"name": "revenue",
                                  "sum": {"event": "Bought", "property": "price", "within": "7d"}}]}],
})
DAY0 = date(2026, 11, 1)
TABLES = {"funnels": "flywheel.funnel_partials", "retention": "flywheel.retention_partials",
          "active_users": "flywheel.active_user_partials", "experiments": "flywheel.experiment_partials"}


OLD = "0ld0ld00"  # a version the definitions had before: its cells stay in the tables, shown by no board


def version_of(rng: random.Random, d) -> str:
    """Mostly the definition's version in force; sometimes an older one, or none (a row written before
    versions were recorded)."""
    return rng.choices([d.version, OLD, ""], weights=[6, 2, 1])[0]


def stream(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    """Records of the four kinds: a few cells on three partitions, each published several times with growing
    versions (the latest wins) — and some republished with an old version (must be ignored)."""
    out = []
    version: dict[tuple, int] = {}

    def publish(kind: str, identity: dict, partition: int, measures: dict) -> None:
        key = (kind, tuple(identity.values()), partition)
        v = version[key] = version.get(key, 0) + rng.randint(1, 3)
        out.append((kind, {**identity, "partition": partition, **measures, "version": v}))
        if rng.random() < 0.1:  # a stale copy, replayed
            out.append((kind, {**identity, "partition": partition,
                               **{k: (type(x)(rng.randint(0, 50)) if k not in ("control", "kind", "scaleY", "scaleX")
                                      else x) for k, x in measures.items()}, "version": max(0, v - 1)}))

    for _ in range(n):
        partition = rng.randrange(3)
        day = (DAY0 + timedelta(days=rng.randrange(10))).isoformat()
        what = rng.randrange(4)
        if what == 0:
            f = rng.choice(METRICS.funnels)
            publish("funnels", {"funnel": f.name, "definitionVersion": version_of(rng, f), "day": day,
                                "step": rng.randint(1, len(f.steps))}, partition, {"persons": rng.randint(0, 40)})
        elif what == 1:
            r = rng.choice(METRICS.retention)
            cohort = DAY0 + timedelta(days=rng.randrange(10))
            if r.period == "week":
                cohort -= timedelta(days=cohort.weekday())
            publish("retention", {"retention": r.name, "definitionVersion": version_of(rng, r),
                                  "cohortDay": cohort.isoformat(), "period": rng.randint(0, r.horizon)}, partition,
                    {"persons": rng.randint(0, 40)})
        elif what == 2:
            publish("active_users", {"kind": rng.choice(["dau", "wau", "mau"]), "day": day}, partition,
                    {"persons": rng.randint(0, 60)})
        else:
            e = METRICS.experiments[0]
            variation = rng.choice(["control", "green"])
            metric = rng.choice(e.metrics)
            n = rng.randint(0, 300)
            sy = rng.randint(0, n) * (1 if metric.kind == "conversion" else 1_000_000 * rng.randint(1, 90))
            big = str(rng.randint(0, 2**70))  # Σy² of revenue in millionths passes 64 bits
            publish("experiments", {"experiment": e.name, "variation": variation, "metric": metric.name}, partition,
                    {"n": n, "sy": str(sy), "syy": big, "sx": "0", "sxx": "0", "sxy": "0", "sp": "0", "spp": "0",
                     "spy": "0", "control": int(variation == "control"), "kind": metric.kind,
                     "scaleY": 1 if metric.kind == "conversion" else 1_000_000, "scaleX": 1})
    # every definition has published under its version in force (the views take the newest version published;
    # the board the registry's — they agree once the new version has published anything)
    for f in METRICS.funnels:
        publish("funnels", {"funnel": f.name, "definitionVersion": f.version, "day": DAY0.isoformat(), "step": 1},
                rng.randrange(3), {"persons": rng.randint(0, 40)})
    for r in METRICS.retention:
        cohort = DAY0 - timedelta(days=DAY0.weekday()) if r.period == "week" else DAY0
        publish("retention", {"retention": r.name, "definitionVersion": r.version, "cohortDay": cohort.isoformat(),
                              "period": 0}, rng.randrange(3), {"persons": rng.randint(0, 40)})
    return out


@pytest.fixture()
def empty(ch):
    for table in TABLES.values():
        ch.rows(f"TRUNCATE TABLE {table}")
    return ch


def fill(ch, records: list[tuple[str, dict]], seed: int) -> board.Partials:
    """All records into ClickHouse; the board: a snapshot after a prefix, then every record, shuffled."""
    rng = random.Random(seed)
    # the views take a definition's current version from its newest row: the old version's rows were written
    # first (while it was in force), a moment before the current one's
    old = [(k, r) for k, r in records if r.get("definitionVersion") == OLD]
    for kind, rec in old:
        ch.insert(TABLES[kind], [row(KIND_BY_NAME[kind], rec)])
    if old:
        time.sleep(0.01)
    records = [(k, r) for k, r in records if r.get("definitionVersion") != OLD]
    cut = rng.randrange(len(records) + 1)
    for kind, rec in records[:cut]:
        ch.insert(TABLES[kind], [row(KIND_BY_NAME[kind], rec)])
    partials = board.Partials()
    for kind in board.BOARD_KINDS:
        board.load_snapshot(partials, kind, ch.rows(board.snapshot_sql(kind))[1])
    for kind, rec in records[cut:]:
        ch.insert(TABLES[kind], [row(KIND_BY_NAME[kind], rec)])
    replay = old + records[rng.randrange(cut + 1):]  # the consumer starts at or before the snapshot's end
    rng.shuffle(replay)
    for kind, rec in replay:
        partials.put_record(kind, rec)
    return partials


def check_against_views(ch, partials: board.Partials) -> None:
    # funnels over a day range: funnel_daily summed, conversion from step 1
    first, last = (DAY0 + timedelta(days=2)).isoformat(), (DAY0 + timedelta(days=6)).isoformat()
    _, rows = ch.rows(f"SELECT funnel, step, sum(persons) FROM flywheel.funnel_daily "
                      f"WHERE day BETWEEN '{first}' AND '{last}' GROUP BY funnel, step")
    view = {(f, int(s)): int(p) for f, s, p in rows}
    shown = board.funnels(METRICS, partials, first, last)
    assert [f["name"] for f in shown] == ["checkout", "signup"]
    for f in shown:
        entered = view.get((f["name"], 1), 0)
        for s in f["steps"]:
            assert s["persons"] == view.get((f["name"], s["step"]), 0), (f["name"], s)
            assert s["conversion"] == (s["persons"] / entered if entered else None)
    # retention: retention_daily cell by cell (it has rows only for returns > 0)
    _, rows = ch.rows("SELECT retention, toString(cohort_day), period, persons, cohort_size "
                      "FROM flywheel.retention_daily")
    view = {(r, c, int(n)): (int(p), int(size)) for r, c, n, p, size in rows}
    shown = {}
    for r in board.retention(METRICS, partials):
        for c in r["cohorts"]:
            for n, persons in enumerate(c["returned"], start=1):
                if persons:
                    shown[(r["name"], c["cohort"], n)] = (persons, c["size"])
    assert shown == view
    # active users: active_users_daily row by row
    _, rows = ch.rows("SELECT toString(day), dau, wau, mau, stickiness FROM flywheel.active_users_daily ORDER BY day")
    assert [(d["day"], d["dau"], d["wau"], d["mau"]) for d in board.active_users(partials)] == \
        [(d, int(a), int(w), int(m)) for d, a, w, m, _ in rows]
    assert [d["stickiness"] for d in board.active_users(partials)] == pytest.approx([s for *_, s in rows], rel=1e-12)
    # experiments: experiment_stats' rows, exact integers, and the same results
    experiment = METRICS.experiments[0]
    view_rows = sorted(tuple(int(v) if i >= 2 else v for i, v in enumerate(r))
                       for r in ch.rows(stats_sql(experiment))[1])
    assert sorted(board.experiment_rows(partials, experiment.name)) == view_rows
    assert from_stats(experiment, board.experiment_rows(partials, experiment.name)) == \
        from_stats(experiment, ch.rows(stats_sql(experiment))[1])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 120))
def test_board_equals_the_views_with_snapshot_and_stream_overlapping(empty, seed, n):
    for table in TABLES.values():
        empty.rows(f"TRUNCATE TABLE {table}")
    records = stream(random.Random(seed), n)
    check_against_views(empty, fill(empty, records, seed))


def test_an_older_version_never_replaces_a_newer_one():
    p = board.Partials()
    assert p.put("funnels", ("f", "2026-11-01", 1), 0, 5, (10,))
    assert not p.put("funnels", ("f", "2026-11-01", 1), 0, 4, (99,))
    assert not p.put("funnels", ("f", "2026-11-01", 1), 0, 5, (99,))  # the same version: a replay
    assert p.put("funnels", ("f", "2026-11-01", 1), 1, 1, (3,))
    assert p.sums("funnels") == {("f", "2026-11-01", 1): (13,)}


def test_recent_events_filter_by_name_person_and_source():
    recent = board.Recent(size=3)
    for i in range(5):
        recent.add_valid({"receivedAt": i, "type": "track", "event": f"E{i % 2}", "personId": f"p{i}",
                          "source": "web", "properties": {"i": i}})
    recent.add_invalid({"receivedAt": 9, "source": "ios", "reasons": ["bad"], "payload": "{}"})
    assert [e["at"] for e in recent.select()] == [9, 4, 3]  # newest first, only `size` kept
    assert [e["at"] for e in recent.select(name="E0")] == [4]
    assert [e["at"] for e in recent.select(person="p3")] == [3]
    assert [e["at"] for e in recent.select(source="ios")] == [9]
    assert recent.select(source="ios")[0]["reasons"] == ["bad"]
    recent.add_valid({"receivedAt": 5, "type": "track", "event": "E", "personId": "q", "source": "web"})
    assert [e["at"] for e in recent.select()] == [9, 5, 4]  # by time received, whatever order they were read in


def test_rate_counts_the_window_only():
    now = [100.0]
    rate = board.Rate(window=10.0, clock=lambda: now[0])
    rate.add(50)
    now[0] = 105.0
    rate.add(30)
    assert rate.per_second() == 8.0
    now[0] = 110.5  # the first 50 left the window
    assert rate.per_second() == 3.0
    assert rate.total == 80


def test_a_changed_definition_counts_anew_and_its_old_version_stays_readable(empty):
    """funnel_daily shows the current version (the one published last), a row of no version (written before
    versions were recorded) standing in where it has none; funnel_daily_versions keeps every version."""
    def put(version: str, day: str, persons: int, v: int) -> None:
        empty.insert(TABLES["funnels"], [{"funnel": "f", "definition_version": version, "day": day, "step": 1,
                                          "kafka_partition": 0, "persons": persons, "version": v}])
        time.sleep(0.005)

    put("", "2026-11-01", 5, 1)
    put("", "2026-11-02", 7, 2)
    put("v1", "2026-11-02", 8, 3)
    put("v1", "2026-11-03", 2, 4)
    daily = "SELECT toString(day), persons FROM flywheel.funnel_daily WHERE funnel = 'f' ORDER BY day"
    assert empty.rows(daily)[1] == [("2026-11-01", 5), ("2026-11-02", 8), ("2026-11-03", 2)]
    put("v2", "2026-11-03", 9, 5)  # changed: v2 counts anew
    assert empty.rows(daily)[1] == [("2026-11-01", 5), ("2026-11-02", 7), ("2026-11-03", 9)]
    versions = empty.rows("SELECT definition_version, toString(day), persons FROM flywheel.funnel_daily_versions "
                          "WHERE funnel = 'f' ORDER BY definition_version, day")[1]
    assert versions == [("", "2026-11-01", 5), ("", "2026-11-02", 7), ("v1", "2026-11-02", 8), ("v1", "2026-11-03", 2),
                        ("v2", "2026-11-03", 9)]
    empty.command("OPTIMIZE TABLE flywheel.funnel_partials FINAL")  # merges keep every version's rows
    assert len(empty.rows("SELECT * FROM flywheel.funnel_partials WHERE funnel = 'f'")[1]) == 5


def test_an_old_version_is_readable_until_dropped_and_the_one_in_force_cannot_be(empty, tmp_path, monkeypatch):
    from flywheel import cli as cli_module
    from flywheel.cli import cli
    from typer.testing import CliRunner

    current = next(f for f in METRICS.funnels if f.name == "checkout").version
    for v, version in ((1, "0ld"), (2, current)):
        empty.insert(TABLES["funnels"], [{"funnel": "checkout", "definition_version": version, "day": "2026-11-01",
                                          "step": 1, "kafka_partition": 0, "persons": 3, "version": v}])
    metrics_file = tmp_path / "metrics.yaml"
    metrics_file.write_text(orjson.dumps({"funnels": [{"name": "checkout", "window": "6h", "steps": [
        {"event": "Viewed"}, {"event": "Added"}, {"event": "Bought"}]}]}).decode())
    monkeypatch.setenv("FLYWHEEL_METRICS", str(metrics_file))
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # no store: the file is in force
    monkeypatch.setattr(cli_module, "_query", lambda settings: empty.rows)
    runner = CliRunner()
    refused = runner.invoke(cli, ["metrics", "drop-version", "funnels", "checkout", current, "--yes"])
    assert refused.exit_code == 1 and "in force" in refused.output
    dry = runner.invoke(cli, ["metrics", "drop-version", "funnels", "checkout", "0ld"])
    assert dry.exit_code == 0 and "would be deleted" in dry.output
    done = runner.invoke(cli, ["metrics", "drop-version", "funnels", "checkout", "0ld", "--yes"])
    assert done.exit_code == 0, done.output
    versions = empty.rows("SELECT DISTINCT definition_version FROM flywheel.funnel_partials WHERE funnel = 'checkout'")
    assert versions[1] == [(current,)]  # the command waits for the deletion to be done
