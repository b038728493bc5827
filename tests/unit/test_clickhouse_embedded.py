"""Migrations and the embedded backend, on real chdb in a temporary directory."""

from datetime import UTC, datetime

import pytest
from flywheel import paths
from flywheel.clickhouse import ClickHouseUnavailable, is_bad_data
from flywheel.clickhouse.embedded import EmbeddedClickHouse
from flywheel.clickhouse.errors import error_code
from flywheel.clickhouse.migrate import apply, migration_files, statements
from flywheel.model.rows import event_row


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    engine = EmbeddedClickHouse(tmp_path_factory.mktemp("chdb"))
    yield engine
    engine.close()


def test_migrations_apply_once_and_are_idempotent(ch):
    first = apply(ch, paths.sql_dir() / "migrations")
    assert first == [f"{v:04d}_{n}" for v, n, _ in migration_files(paths.sql_dir() / "migrations")]
    assert apply(ch, paths.sql_dir() / "migrations") == []
    tables = {r[0] for r in ch.rows("SELECT name FROM system.tables WHERE database = 'flywheel'")[1]}
    assert {"events", "invalid_events", "schema_migrations"} <= tables


def test_event_rows_round_trip_with_millisecond_times(ch):
    apply(ch, paths.sql_dir() / "migrations")
    event = {
        "messageId": "m-rt", "type": "track", "event": "Viewed", "anonymousId": "a", "userId": "", "personId": "a",
        "previousId": "", "groupId": "", "timestamp": 1_700_000_000_123, "receivedAt": 1_700_000_001_000,
        "sentAt": None, "properties": {"price": 9.5, "tags": ["x"]}, "traits": {}, "context": {"ip": "1.2.3.4"},
        "source": "test",
    }
    ch.insert("flywheel.events", [event_row(event)])
    _, rows = ch.rows(
        "SELECT toUnixTimestamp64Milli(timestamp), sent_at, JSONExtractFloat(properties, 'price'), late "
        "FROM flywheel.events WHERE message_id = 'm-rt'"
    )
    assert rows == [(1_700_000_000_123, None, 9.5, 0)]


def test_a_redelivered_row_collapses_under_final(ch):
    apply(ch, paths.sql_dir() / "migrations")
    row = {"received_at": datetime(2026, 1, 1, tzinfo=UTC), "source": "s", "reasons": ["r"], "payload": "{",
           "payload_encoding": "utf-8", "origin": "events.raw/0@7"}
    ch.insert("flywheel.invalid_events", [row])
    ch.insert("flywheel.invalid_events", [row])
    assert ch.rows("SELECT count() FROM flywheel.invalid_events FINAL WHERE origin = 'events.raw/0@7'")[1] == [(1,)]


def test_bad_data_is_classified_as_not_retryable(ch):
    ch.command("CREATE TABLE IF NOT EXISTS default.nums (n UInt32) ENGINE = MergeTree ORDER BY n")
    with pytest.raises(Exception) as err:
        ch.insert("default.nums", [{"n": "not a number"}])
    assert is_bad_data(err.value)
    assert not is_bad_data(ClickHouseUnavailable("Connection refused"))
    assert error_code(Exception("Code: 117. DB::Exception")) == 117


def test_a_second_process_gets_a_clear_error_while_the_directory_is_held(ch):
    import subprocess
    import sys

    code = (
        "from flywheel.clickhouse.embedded import EmbeddedClickHouse\n"
        "from flywheel.clickhouse import ClickHouseUnavailable\n"
        f"try:\n    EmbeddedClickHouse({str(ch.path)!r})\nexcept ClickHouseUnavailable as e:\n    print('HELD', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HELD" in out.stdout and "flywheel sql" in out.stdout, out.stdout + out.stderr


def test_statements_split_on_semicolons_at_line_ends_and_drop_comments():
    sql = "-- c;\nCREATE TABLE a (x String COMMENT 'a;b');\n\nCREATE VIEW v AS SELECT 1;\n"
    assert statements(sql) == ["CREATE TABLE a (x String COMMENT 'a;b')", "CREATE VIEW v AS SELECT 1"]


def test_every_sql_example_in_the_readme_runs(ch):
    import re

    apply(ch, paths.sql_dir() / "migrations")
    readme = (paths.home() / "README.md").read_text()
    queries = [q for block in re.findall(r"```sql\n(.*?)```", readme, re.S) for q in statements(block)]
    assert len(queries) >= 5
    for query in queries:
        ch.rows(query)  # raises with ClickHouse's message if an example is wrong


def test_experiment_sums_beyond_64_bits_land_and_add_up_exactly(ch):
    """metrics.experiments records through the sink's row into experiment_partials (Int128), and the
    experiment_stats view summing each partition's latest version."""
    from flywheel.metrics.cells import KIND_BY_NAME, row

    apply(ch, paths.sql_dir() / "migrations")
    kind = KIND_BY_NAME["experiments"]
    big = 10**20 + 1

    def rec(partition: int, n: int, sy: int, version: int) -> dict:
        return {"experiment": "x", "variation": "a", "metric": "m", "partition": partition, "n": n, "sy": str(sy),
                "syy": str(sy * sy), "sx": "0", "sxx": "0", "sxy": "0", "sp": "0", "spp": "0", "spy": "0",
                "control": 0, "kind": "sum", "scaleY": 1, "scaleX": 1, "version": version}
    ch.insert(kind.table, [row(kind, r) for r in (rec(0, 1, 5, 1), rec(0, 2, big, 2), rec(1, 3, big, 1))])
    _, rows = ch.rows("SELECT n, toString(sy), toString(syy) FROM flywheel.experiment_stats WHERE experiment = 'x'")
    assert rows == [(5, str(2 * big), str(2 * big * big))]


def test_experiment_results_view_equals_the_normal_approximation_of_the_statistics(ch):
    """experiment_results over records of two partitions: each variation against the control, means in the
    property's unit, lifts with normal 95 % intervals and p-values — the same numbers as metrics/stats.py's
    arms (their means and Welch variances; ratio and relative lift by the delta method) give."""
    import random
    from statistics import NormalDist

    from experiments_gen import SPEC
    from flywheel.metrics.cells import KIND_BY_NAME, record, row
    from flywheel.metrics.definitions import parse_metrics
    from flywheel.metrics.exposures import per_person, scales
    from flywheel.metrics.stats import Arm

    apply(ch, paths.sql_dir() / "migrations")
    e = parse_metrics({"experiments": [{**SPEC["experiments"][0], "name": "view_check"}]}).experiments[0]
    rng = random.Random(4)
    sums: dict[tuple[int, int, int], list[int]] = {}  # (variation, metric, partition) → STATS sums
    for v in range(len(e.variations)):
        for _ in range(400 + 100 * v):
            partition = rng.randrange(2)
            for m, metric in enumerate(e.metrics):
                ky, kx = scales(metric)
                y = {"conversion": rng.random() < 0.2 + 0.05 * v, "sum": round(rng.expovariate(1 / 30), 2) * ky,
                     "count": rng.randrange(4), "ratio": rng.randrange(3)}[metric.kind]
                x = rng.randrange(1, 4) if metric.kind == "ratio" else 0
                row_ = sums.setdefault((v, m, partition), [0] * 9)
                for i, value in enumerate(per_person(int(y), x, 0)):
                    row_[i] += value
    kind = KIND_BY_NAME["experiments"]
    ch.insert(kind.table, [row(kind, record((e, v, m), p, tuple(s), 1)[2]) for (v, m, p), s in sums.items()])
    _, rows = ch.rows("SELECT metric, variation, n, mean, control_mean, lift, lift_lower, p_value, relative_lift, "
                      "relative_upper, relative_p_value FROM flywheel.experiment_results "
                      "WHERE experiment = 'view_check'")
    z = NormalDist().inv_cdf(0.975)

    def arm(v: int, m: int) -> Arm:
        s = [a + b for a, b in zip(sums[(v, m, 0)], sums[(v, m, 1)], strict=True)]
        ky, kx = scales(e.metrics[m])
        kinds = {"conversion": "proportion", "ratio": "ratio"}
        return Arm(s[0], s[1] / ky, s[2] / ky ** 2, kinds.get(e.metrics[m].kind, "mean"), s[3] / kx, s[4] / kx ** 2,
                   s[5] / (kx * ky))
    assert len(rows) == 2 * len(e.metrics)  # two variations against the control, per metric
    for metric, variation, n, mean, control_mean, lift, lift_lower, p, rel, rel_upper, rel_p in rows:
        m = next(i for i, x in enumerate(e.metrics) if x.name == metric)
        b, a = arm(next(i for i, (name, _) in enumerate(e.variations) if name == variation), m), arm(0, m)
        se = (b.variance / b.n + a.variance / a.n) ** 0.5
        rse = (b.variance / (a.mean ** 2 * b.n) + a.variance * b.mean ** 2 / (a.mean ** 4 * a.n)) ** 0.5
        want = (b.n, b.mean, a.mean, b.mean - a.mean, b.mean - a.mean - z * se,
                2 * NormalDist().cdf(-abs(b.mean - a.mean) / se), (b.mean - a.mean) / a.mean,
                (b.mean - a.mean) / a.mean + z * rse, 2 * NormalDist().cdf(-abs((b.mean - a.mean) / a.mean) / rse))
        got = (n, mean, control_mean, lift, lift_lower, p, rel, rel_upper, rel_p)
        assert all(abs(g - w) <= 1e-9 * max(1.0, abs(w)) for g, w in zip(got, want, strict=True)), (metric, got, want)
