"""tests/union_store.py on real chdb: two stopped stores → one union, bit for bit, views over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flywheel import paths
from flywheel.clickhouse import migrate
from flywheel.clickhouse.embedded import EmbeddedClickHouse
from flywheel.config import Settings
from flywheel.model.rows import event_row, identity_rows
from union_store import UnionStore, UnionStoreError, copied_tables, ident

# A later migration as funnels/retention may add: awkward types, computed columns, materialized views
# with a TO table and with an inner table.
EXTRA_MIGRATION = """
CREATE TABLE IF NOT EXISTS flywheel.tricky
(
    k   String,
    b   String,
    n   Nullable(DateTime64(6, 'UTC')),
    a   Array(Nullable(String)),
    lc  LowCardinality(Nullable(String)),
    m   Map(String, UInt64),
    u   UInt64,
    i   Int128,
    f   Float64,
    d   Decimal(38, 10),
    e   Enum8('x' = 1, 'y' = 2),
    id  UUID,
    t   Tuple(String, Array(UInt8)),
    mat UInt64 MATERIALIZED length(b),
    al  UInt64 ALIAS u + 1
)
ENGINE = MergeTree ORDER BY k;

CREATE TABLE IF NOT EXISTS flywheel.event_counts (event String, n UInt64) ENGINE = SummingMergeTree ORDER BY event;

CREATE MATERIALIZED VIEW IF NOT EXISTS flywheel.event_counts_mv TO flywheel.event_counts
AS SELECT event, count() AS n FROM flywheel.events GROUP BY event;

CREATE MATERIALIZED VIEW IF NOT EXISTS flywheel.type_counts_mv ENGINE = SummingMergeTree ORDER BY type
AS SELECT type, count() AS n FROM flywheel.events GROUP BY type;
"""

TRICKY_ROWS = {
    "a": "('a', 'plain', '2026-11-10 09:00:00.123456', ['x', NULL, ''], NULL, {'k': 18446744073709551615}, "
         "18446744073709551615, -170141183460469231731687303715884105728, nan, -12345.6789012345, 'x', "
         "'00000000-0000-0000-0000-000000000001', ('t', [0, 10, 255]))",
    "b": "('b', 'not utf-8: \\xFF\\xFE\\x00 end', NULL, [], 'lc', {}, 0, 1, -0., 0, 'y', "
         "'ffffffff-ffff-ffff-ffff-ffffffffffff', ('', []))",
    "c": "('c', 'quote \\' backslash \\\\ tab \\t newline \\n', '1970-01-01 00:00:00.000001', [NULL], '', "
         "{'': 0}, 1, 0, inf, 0.0000000001, 'x', '12345678-1234-5678-1234-567812345678', ('\\n', [10]))",
}


def event(mid: str, anon: str, user: str = "", ts: int = 1_790_000_000_000, name: str = "Product Viewed") -> dict:
    return event_row({
        "messageId": mid, "type": "track", "event": name, "anonymousId": anon, "userId": user,
        "personId": user or anon, "previousId": "", "groupId": "", "timestamp": ts, "receivedAt": ts + 5,
        "sentAt": None if mid.endswith("0") else ts + 1, "properties": {"product_id": mid}, "traits": {},
        "context": {}, "source": "test",
    })


@pytest.fixture(scope="module")
def migrations(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("migrations")
    for path in (paths.sql_dir() / "migrations").glob("*.sql"):
        shutil.copy(path, folder / path.name)
    (folder / "0099_union_test.sql").write_text(EXTRA_MIGRATION)
    return folder


def make_store(data_dir: Path, migrations: Path, *, events: list[dict], links: list[dict],
               tricky: list[str]) -> Settings:
    """A stopped worker's store: opened, filled and closed in this process (as query.run does)."""
    ch = EmbeddedClickHouse(data_dir / "clickhouse")
    try:
        migrate.apply(ch, migrations)
        ch.insert("flywheel.events", events)
        for change in links:
            table, row = identity_rows(change)
            ch.insert(table, [row])
        for key in tricky:
            ch.command(f"INSERT INTO flywheel.tricky VALUES {TRICKY_ROWS[key]}")
        ch.command("INSERT INTO flywheel.invalid_events (received_at, source, reasons, payload, payload_encoding, "
                   f"origin) VALUES (now64(3), 's', ['r1', 'r2'], '\\xC3\\x28', 'base64', '{data_dir.name}/0@1')")
    finally:
        ch.close()
    return Settings(data_dir=data_dir)


def exact_rows(target, table: str, columns: list[str]) -> list[str]:
    """Every row of a table as the hex of its RowBinary bytes: equal means equal bit for bit."""
    names = ", ".join(ident(c) for c in columns)
    sql = f"SELECT hex(formatRow('RowBinary', {names})) FROM flywheel.{ident(table)}"
    return sorted(r[0] for r in target(sql))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, migrations):
    root = tmp_path_factory.mktemp("stores")
    a = make_store(root / "a", migrations, tricky=["a", "b"], links=[], events=[
        event("m0", "anon-1"), event("m1", "anon-1", name="Product Added"), event("m2", "anon-2"),
    ])
    b = make_store(root / "b", migrations, tricky=["c"], events=[
        event("m3", "anon-1", "user-1", name="Signed In"), event("m4", "", "user-2"),
    ], links=[{"type": "link", "anonymousId": "anon-1", "userId": "user-1", "messageId": "m3",
               "timestamp": 1_790_000_000_000},
              {"type": "conflict", "anonymousId": "anon-1", "linkedTo": "user-1", "refused": "user-3",
               "messageId": "m5", "timestamp": 1_790_000_000_001}])
    return a, b


@pytest.fixture(scope="module")
def union(tmp_path_factory, migrations, stores):
    with UnionStore(tmp_path_factory.mktemp("union"), migrations=migrations) as store:
        store.copied_a = store.add(stores[0])
        store.copied_b = store.add(stores[1])
        yield store


def source_sql(settings: Settings):
    from flywheel import query

    return lambda sql: query.run(settings, sql)[1]


def test_every_table_is_copied_exactly(union, stores):
    plain = [t for t in union.tables() if not t.startswith(".inner")]  # inner tables: see the view test
    filled = {"events", "identity_map", "identity_conflicts", "invalid_events", "tricky", "event_counts"}
    assert filled <= set(plain)  # and any table of a later migration, empty here
    assert set(plain) <= set(union.copied_a) and set(plain) <= set(union.copied_b)
    assert "schema_migrations" not in union.copied_a
    for table in plain:
        cols = [r[0] for r in union.sql("SELECT name FROM system.columns WHERE database = 'flywheel' "
                                        f"AND table = '{table}' ORDER BY position")]
        expected = sorted(exact_rows(source_sql(stores[0]), table, cols) + exact_rows(source_sql(stores[1]), table,
                                                                                      cols))
        assert exact_rows(union.sql, table, cols) == expected, table
        assert len(expected) == union.copied_a[table] + union.copied_b[table], table
        assert len(expected) > 0 or table not in filled, table


def test_awkward_values_survive(union):
    rows = union.sql("SELECT k, hex(b), n, a, lc, toString(u), toString(i), isNaN(f), toString(d), e, "
                     "toString(id), mat, al FROM flywheel.tricky ORDER BY k")
    assert rows[0][:4] == ["a", "706C61696E", "2026-11-10 09:00:00.123456", ["x", None, ""]]
    assert rows[0][4:] == [None, "18446744073709551615", "-170141183460469231731687303715884105728", 1,
                           "-12345.6789012345", "x", "00000000-0000-0000-0000-000000000001", 5, 0]
    assert bytes.fromhex(rows[1][1]) == b"not utf-8: \xff\xfe\x00 end"
    assert rows[1][2] is None and rows[1][4] == "lc" and rows[1][12] == 1
    assert union.sql("SELECT hex(payload) FROM flywheel.invalid_events ORDER BY origin") == [["C328"], ["C328"]]


def test_views_run_on_the_union(union):
    # The events of anon-1 are in store a, its link in store b: only the union stitches them.
    resolved = dict(union.sql("SELECT message_id, person_id FROM flywheel.events_resolved"))
    assert resolved == {"m0": "user-1", "m1": "user-1", "m2": "anon-2", "m3": "user-1", "m4": "user-2"}
    # Every view of every migration (funnels, retention, ... as they come) runs on the union.
    views = [r[0] for r in union.sql("SELECT name FROM system.tables WHERE database = 'flywheel' AND engine = 'View'")]
    assert "events_resolved" in views
    for view in views:
        union.sql(f"SELECT * FROM flywheel.{ident(view)} LIMIT 1")


def test_materialized_view_targets_hold_the_sources_rows_once(union):
    # Copied, not also recomputed from the copied events (the views were detached during the copy).
    assert union.sql("SELECT event, sum(n) FROM flywheel.event_counts GROUP BY event ORDER BY event") == [
        ["Product Added", 1], ["Product Viewed", 3], ["Signed In", 1]]
    inner = [t for t in union.tables() if t.startswith(".inner_id.")]
    assert len(inner) == 1
    assert union.sql(f"SELECT type, sum(n) FROM flywheel.{ident(inner[0])} GROUP BY type") == [["track", 5]]
    # ... and the views work again afterwards.
    union.command("INSERT INTO flywheel.events (message_id, type, event, timestamp, received_at) "
                  "VALUES ('m9', 'track', 'Signed In', now64(3), now64(3))")
    assert union.scalar("SELECT sum(n) FROM flywheel.event_counts WHERE event = 'Signed In'") == 2


def test_a_store_with_another_schema_is_refused(tmp_path, stores):
    # The repository's migrations have no flywheel.tricky: copying it would silently drop rows.
    with UnionStore(tmp_path / "union") as store, pytest.raises(UnionStoreError, match="no counterpart"):
        store.add(stores[0])


def test_copied_tables_are_the_ones_with_rows_of_their_own():
    tables = [["events", "ReplacingMergeTree", "u1"], ["events_resolved", "View", "u2"],
              ["schema_migrations", "ReplacingMergeTree", "u3"], ["mv", "MaterializedView", "u4"],
              [".inner_id.u4", "SummingMergeTree", "u5"], ["d", "Dictionary", "u6"]]
    assert copied_tables(tables) == ["events", ".inner_id.u4"]
