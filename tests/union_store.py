"""The union of several workers' embedded ClickHouse stores, for tests that run more than one worker.

Embedded ClickHouse (chdb) belongs to one process per data directory, so each worker of a pipeline
has its own store holding the rows of the partitions it sank. `UnionStore` copies the `flywheel`
tables of any number of workers (running or stopped) into one fresh embedded ClickHouse to which
the repository's migrations were applied, so the views (`events_resolved`, and the funnel and
retention views of later migrations) run over the union of the rows:

    with UnionStore(tmp_path / "union") as union:
        union.add(worker_a)                  # a WorkerProcess or its Settings; running or stopped
        union.add(worker_b)
        union.sql("SELECT message_id, person_id FROM flywheel.events_resolved")

What is copied: every table of database `flywheel` that stores rows (system.tables, engine not a
view and not one of the engines without data of their own), except `schema_migrations`. The tables
are discovered on each source, so tables added by later migrations are copied with no change here.
Rows move exactly: each source row is read as `formatRow('RowBinary', <columns>)` (base64 in
transit) and inserted with `FORMAT RowBinary`, so DateTime64, Nullable, Array, LowCardinality,
64-bit integers, floats and non-UTF-8 strings arrive bit for bit. DEFAULT columns (inserted_at) keep
the source's values; MATERIALIZED / ALIAS columns are recomputed by the union's schema.
Materialized views are detached while rows are copied and attached again afterwards, so a view's
target table holds the sources' rows once (copied) rather than twice (copied + recomputed); an inner
table (`.inner_id.<uuid>`) is matched to its view by the view's name.

How it reaches the stores: through `flywheel.query.run` with the source's Settings, which asks a
running worker's /sql endpoint and opens a stopped worker's data directory itself (in *this*
process). chdb runs one engine per process, on one data directory (a second Session on another path
fails with "EmbeddedServer already initialized with path ..."), so:
- the union store runs in a child process of its own (`python tests/union_store.py --serve DIR`),
  talking length-prefixed JSON frames over stdin/stdout;
- this process must not hold a chdb session of its own while reading a stopped worker (sessions
  opened and closed one after the other are fine: that is what query.run does).

Limits: a running worker's tables are read one after the other, not as one snapshot (wait until the
pipeline is idle before adding it); every table is read whole into memory (fine for test sizes);
workers that share one ClickHouse server need no union (the server is it) and adding the server
twice would copy every row twice.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

from flywheel import paths, query
from flywheel.config import Settings

DATABASE = "flywheel"
VERSION_TABLE = "schema_migrations"
# Engines that hold no rows of their own (views are excluded by name: '%View%').
NO_DATA_ENGINES = ("Dictionary", "Distributed", "Merge", "Buffer", "Null", "Kafka", "URL", "File")
# Columns an INSERT cannot (or should not) set: computed by the table's own definition.
COMPUTED_KINDS = ("MATERIALIZED", "ALIAS", "EPHEMERAL")


def ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _settings_of(source: Any) -> Settings:
    settings = getattr(source, "settings", source)
    if not isinstance(settings, Settings):
        raise TypeError(f"a source is a WorkerProcess or flywheel Settings, got {type(source).__name__}")
    return settings


def _query(settings: Settings, sql: str) -> list[list]:
    return query.run(settings, sql)[1]


def _tables_sql() -> str:
    return (
        f"SELECT name, engine, toString(uuid) FROM system.tables WHERE database = {literal(DATABASE)} "
        "AND NOT is_temporary ORDER BY name"
    )


def _columns_sql() -> str:
    kinds = ", ".join(literal(k) for k in COMPUTED_KINDS)
    return (
        f"SELECT table, name, type FROM system.columns WHERE database = {literal(DATABASE)} "
        f"AND default_kind NOT IN ({kinds}) ORDER BY table, position"
    )


def copied_tables(tables: list[list]) -> list[str]:
    """Names of the tables of `system.tables` rows (name, engine, uuid) whose rows are copied."""
    return [name for name, engine, _ in tables
            if name != VERSION_TABLE and "View" not in engine and engine not in NO_DATA_ENGINES]


def _inner_owner(name: str, tables: list[list]) -> str | None:
    """The materialized view whose inner table `name` is (`.inner_id.<view uuid>`, `.inner.<view>`)."""
    if name.startswith(".inner_id."):
        uuid = name.removeprefix(".inner_id.")
        return next((n for n, engine, u in tables if engine == "MaterializedView" and u == uuid), None)
    if name.startswith(".inner."):
        return name.removeprefix(".inner.")
    return None


class UnionStoreError(RuntimeError):
    pass


class UnionStore:
    """A fresh embedded ClickHouse in a child process, with the migrations applied, holding the union
    of the flywheel tables of the sources given to `add`."""

    def __init__(self, directory: Path, *, migrations: Path | None = None):
        self.dir = Path(directory)
        self.migrations = migrations or paths.sql_dir() / "migrations"
        self.log_path = self.dir / "union-store.log"
        self.proc: subprocess.Popen | None = None
        self.copied: list[dict[str, int]] = []  # rows copied per table, one dict per add()

    # ------------------------------------------------------------------ the child process

    def start(self) -> UnionStore:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.dir / "clickhouse"),
                 str(self.migrations)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self.dir,
            )
        self._request({"op": "ping"})  # migrations applied once this answers
        return self

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self._request({"op": "close"})
            self.proc.wait(timeout=60)
        except (UnionStoreError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=30)
        finally:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe:
                    pipe.close()

    def __enter__(self) -> UnionStore:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            raise UnionStoreError(f"the union store is not running\n{self._log_tail()}")
        try:
            _write_frame(self.proc.stdin, header, payload)
            answer, _ = _read_frame(self.proc.stdout)
        except (OSError, EOFError) as exc:
            raise UnionStoreError(f"the union store process failed: {exc}\n{self._log_tail()}") from exc
        if "error" in answer:
            raise UnionStoreError(answer["error"])
        return answer

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no union store log)"

    # ------------------------------------------------------------------ queries

    def sql(self, sql: str) -> list[list]:
        return self._request({"op": "rows", "sql": sql})["rows"]

    def scalar(self, sql: str) -> Any:
        return self.sql(sql)[0][0]

    def command(self, sql: str) -> None:
        self._request({"op": "command", "sql": sql})

    def tables(self) -> list[str]:
        """The tables whose rows a union holds (same rule as for the sources)."""
        return copied_tables(self.sql(_tables_sql()))

    # ------------------------------------------------------------------ copying

    def add(self, source: Any) -> dict[str, int]:
        """Copy every flywheel table of `source` (a WorkerProcess or Settings) into the union.
        Returns the rows copied per table (every copied table is a key, 0 if it was empty)."""
        settings = _settings_of(source)
        src_tables = _query(settings, _tables_sql())
        src_columns: dict[str, list[tuple[str, str]]] = {}
        for table, name, type_ in _query(settings, _columns_sql()):
            src_columns.setdefault(table, []).append((name, type_))
        own_tables = self.sql(_tables_sql())
        own_columns: dict[str, list[tuple[str, str]]] = {}
        for table, name, type_ in self.sql(_columns_sql()):
            own_columns.setdefault(table, []).append((name, type_))
        views = [name for name, engine, _ in own_tables if engine == "MaterializedView"]

        plan: list[tuple[str, str, list[tuple[str, str]]]] = []  # (source table, union table, columns)
        for table in copied_tables(src_tables):
            target = table
            owner = _inner_owner(table, src_tables)
            if owner is not None:
                target = next((n for n in copied_tables(own_tables) if _inner_owner(n, own_tables) == owner), "")
            if target not in own_columns:
                what = table if owner is None else f"{table} (the inner table of {owner})"
                raise UnionStoreError(
                    f"{settings.data_dir}: table {DATABASE}.{what} has no counterpart in the union store: "
                    f"the worker's schema is not the one of {self.migrations}"
                )
            if src_columns.get(table, []) != own_columns[target]:
                raise UnionStoreError(
                    f"{settings.data_dir}: {DATABASE}.{table} columns {src_columns.get(table)} differ from the "
                    f"union store's {own_columns[target]}"
                )
            plan.append((table, target, src_columns[table]))

        copied: dict[str, int] = {}
        for view in views:
            self.command(f"DETACH TABLE {DATABASE}.{ident(view)}")
        try:
            for table, target, columns in plan:
                names = ", ".join(ident(name) for name, _ in columns)
                rows = _query(settings, f"SELECT base64Encode(formatRow('RowBinary', {names})) "
                                        f"FROM {DATABASE}.{ident(table)}")
                copied[table] = len(rows)
                if not rows:
                    continue
                payload = b"".join(base64.b64decode(r[0]) for r in rows)
                answer = self._request(
                    {"op": "insert", "sql": f"INSERT INTO {DATABASE}.{ident(target)} ({names})",
                     "format": "RowBinary"}, payload)
                if answer["rows_written"] != len(rows):
                    raise UnionStoreError(
                        f"{DATABASE}.{table}: {len(rows)} rows read, {answer['rows_written']} written"
                    )
        finally:
            for view in views:
                self.command(f"ATTACH TABLE {DATABASE}.{ident(view)}")
        self.copied.append(copied)
        return copied


def union_of(directory: Path, sources: list[Any], *, migrations: Path | None = None) -> UnionStore:
    """A started UnionStore holding the union of `sources` (close it, or use it in a `with`)."""
    store = UnionStore(directory, migrations=migrations).start()
    try:
        for source in sources:
            store.add(source)
    except BaseException:
        store.close()
        raise
    return store


# ---------------------------------------------------------------------- framing (both sides)

_LENGTHS = struct.Struct(">IQ")  # header bytes, payload bytes


def _write_frame(out: BinaryIO, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header, default=str).encode()
    out.write(_LENGTHS.pack(len(head), len(payload)) + head + payload)
    out.flush()


def _read_exactly(inp: BinaryIO, n: int) -> bytes:
    data = inp.read(n)
    if len(data) != n:
        raise EOFError(f"the other side closed the pipe ({len(data)} of {n} bytes)")
    return data


def _read_frame(inp: BinaryIO) -> tuple[dict[str, Any], bytes]:
    head_len, payload_len = _LENGTHS.unpack(_read_exactly(inp, _LENGTHS.size))
    header = json.loads(_read_exactly(inp, head_len))
    return header, _read_exactly(inp, payload_len) if payload_len else b""


# ---------------------------------------------------------------------- the child process


def _serve(data_dir: str, migrations: str) -> None:
    # The protocol owns the original stdout; anything chdb prints goes to stderr (the log).
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    from flywheel.clickhouse import migrate
    from flywheel.clickhouse.embedded import EmbeddedClickHouse

    class Engine(EmbeddedClickHouse):
        def insert_bytes(self, sql: str, fmt: str, payload: bytes) -> int:
            """INSERT bytes already in ClickHouse format `fmt` (chdb's streaming insert); rows written."""
            with self._lock:
                inserter = self._session.send_insert(sql, fmt)
                try:
                    inserter.append(payload)
                except BaseException:
                    inserter.cancel()
                    raise
                return inserter.finish().rows_written

    ch = Engine(Path(data_dir))
    migrate.apply(ch, Path(migrations))
    print(f"union store: {ch.label}, migrations from {migrations}", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                header, payload = _read_frame(inp)
            except EOFError:
                return
            op = header.get("op")
            try:
                if op == "ping":
                    answer: dict[str, Any] = {"ok": True}
                elif op == "rows":
                    columns, rows = ch.rows(header["sql"])
                    answer = {"columns": columns, "rows": [list(r) for r in rows]}
                elif op == "command":
                    ch.command(header["sql"])
                    answer = {"ok": True}
                elif op == "insert":
                    answer = {"rows_written": ch.insert_bytes(header["sql"], header["format"], payload)}
                elif op == "close":
                    _write_frame(out, {"ok": True})
                    return
                else:
                    answer = {"error": f"unknown op {op!r}"}
            except Exception as exc:  # the statement's own error, for the caller
                answer = {"error": f"{type(exc).__name__}: {exc}".strip()}
            _write_frame(out, answer)
    finally:
        ch.close()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--serve":
        raise SystemExit("usage: union_store.py --serve CLICKHOUSE_DIR MIGRATIONS_DIR")
    _serve(sys.argv[2], sys.argv[3])
