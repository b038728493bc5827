"""`flywheel`: the command line. Every command reads the same configuration (FLYWHEEL_* / flywheel.yaml)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from flywheel import config as config_mod

cli = typer.Typer(
    help="Flywheel: real-time product analytics on Kafka and ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
kafka_cli = typer.Typer(help="A local single-node Kafka for development and tests (jars from Maven Central).")
cli.add_typer(kafka_cli, name="kafka")


def _settings() -> config_mod.Settings:
    try:
        return config_mod.load()
    except Exception as exc:
        _fail(f"configuration error: {exc}")


def _fail(message: str, code: int = 1):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _query(settings: config_mod.Settings):
    """flywheel.query.run for the commands: while it waits (a worker starting, the directory held for a
    moment) it says why on stderr — once per reason, then every 10 s."""
    from flywheel.query import run

    said: dict[str, float] = {}
    started = time.monotonic()

    def on_wait(why: str) -> None:
        now = time.monotonic()
        if why not in said:
            typer.echo(f"waiting: {why}", err=True)
            said[why] = now
        elif now - said[why] >= 10:
            typer.echo(f"still waiting ({now - started:.0f} s): {why}", err=True)
            said[why] = now

    return lambda sql: run(settings, sql, on_wait=on_wait)


def _in_force(settings: config_mod.Settings):
    """The definitions in force (flywheel.registry: the stored ones, else the metrics file's; with Kafka
    unreachable, the file's with a warning on stderr)."""
    from flywheel.registry import metrics_in_force

    return metrics_in_force(settings)


@cli.command()
def worker() -> None:
    """Run the pipeline: apply migrations, create topics, then validate → identity → funnels, retention,
    active users → ClickHouse until stopped.

    Serves the Segment collector (/v1/*) on FLYWHEEL_HTTP_HOST:FLYWHEEL_HTTP_PORT and /health, /metrics and
    /sql on the admin listener, FLYWHEEL_ADMIN_HOST:FLYWHEEL_ADMIN_PORT (127.0.0.1:8089). Several workers
    may run with the same FLYWHEEL_APP_ID, each with its own FLYWHEEL_DATA_DIR and ports, against a
    ClickHouse server or a `flywheel store` (FLYWHEEL_CLICKHOUSE_URL=flywheel:///<its data dir>); with
    embedded ClickHouse and no store, one worker owns the data directory.
    """
    from flywheel.metrics.definitions import MetricsError
    from flywheel.model.plan import PlanError
    from flywheel.worker import run

    try:
        run(_settings())
    except (PlanError, MetricsError) as exc:
        _fail(str(exc))


@cli.command()
def store() -> None:
    """Own the embedded ClickHouse (FLYWHEEL_DATA_DIR) for several workers on this machine.

    Applies the migrations, then serves /store/insert, /sql, /health and /metrics on the admin listener
    (FLYWHEEL_ADMIN_HOST:FLYWHEEL_ADMIN_PORT) until stopped. Start each worker with its own FLYWHEEL_DATA_DIR
    and ports and FLYWHEEL_CLICKHOUSE_URL=flywheel:///<this data dir>; `flywheel sql` with this data dir
    queries through the store. Across machines, use a ClickHouse server instead.
    """
    from flywheel.store import run

    run(_settings())


@cli.command()
def collector(
    port: Annotated[int | None, typer.Option(help="listen port; default FLYWHEEL_HTTP_PORT")] = None,
    host: Annotated[str | None, typer.Option(help="listen address; default FLYWHEEL_HTTP_HOST")] = None,
) -> None:
    """Run the Segment HTTP collector alone (/v1/* and /health; /metrics on the admin listener), to scale
    it apart from workers.

    `flywheel worker` serves the same endpoints; this is for running more collectors than workers.
    Events go to events.raw in Kafka transactions (topics are created by the worker), answered 200 once
    committed, 503 + Retry-After when Kafka is unavailable. Write keys: FLYWHEEL_WRITE_KEYS; events
    record their source as writekey:<first 12 hex digits of the key's SHA-256>, never the key.
    """
    from flywheel.collector.server import run_standalone
    from flywheel.observability import setup_logging

    settings = _settings()
    setup_logging(settings.log_level, settings.log_format)
    run_standalone(settings, host=host or settings.http_host, port=port or settings.http_port)


@cli.command()
def ui(
    port: Annotated[int | None, typer.Option(help="listen port; default FLYWHEEL_UI_PORT (8090)")] = None,
    host: Annotated[str | None, typer.Option(help="listen address; default FLYWHEEL_UI_HOST (127.0.0.1)")] = None,
) -> None:
    """Run the web UI on its own: http://HOST:PORT/ui (a worker also serves it on its admin listener,
    http://127.0.0.1:8089/ui, unless FLYWHEEL_UI=false).

    Pages: overview, funnels, retention, active users, segments, experiments, alerts, data quality, live
    events — pushed to the browser as they change. It reads the same Kafka (its own consumer of every
    partition) and ClickHouse (a server directly; embedded ClickHouse through the running worker).
    Log in as a user made with `flywheel users add NAME --role admin`; keep the address private or behind
    TLS: it is not meant for the public internet.
    """
    from flywheel.metrics.definitions import MetricsError
    from flywheel.observability import setup_logging
    from flywheel.web.ui import run_standalone

    settings = _settings()
    setup_logging(settings.log_level, settings.log_format)
    try:
        run_standalone(settings, host=host or settings.ui_host, port=port or settings.ui_port)
    except MetricsError as exc:
        _fail(str(exc))


@cli.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run, e.g. \"SELECT count() FROM flywheel.events\"")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | tsv | json (one object per row)")] = "table",
) -> None:
    """Run a query on the configured ClickHouse (embedded included, also while a worker holds it). While a
    worker is starting, or another command holds embedded ClickHouse for a moment, it waits (up to 120 s)
    and says so on stderr."""
    from flywheel.query import QueryError, format_table

    if fmt not in ("table", "tsv", "json"):
        _fail(f"--format must be table, tsv or json, not {fmt!r}", 2)
    try:
        columns, rows = _query(_settings())(query)
    except QueryError as exc:
        _fail(str(exc))
    if columns:
        typer.echo(format_table(columns, rows, fmt))


@cli.command()
def migrate() -> None:
    """Apply pending ClickHouse migrations from sql/migrations (the worker also does this at start)."""
    from flywheel import clickhouse, paths
    from flywheel.clickhouse import migrate as migrations

    settings = _settings()
    ch = clickhouse.connect(url=settings.clickhouse_url, data_dir=settings.clickhouse_dir)
    try:
        applied = migrations.apply(ch, paths.sql_dir() / "migrations")
    finally:
        ch.close()
    typer.echo(f"applied: {', '.join(applied)}" if applied else f"{ch.label} is up to date")


@cli.command()
def sample(
    events: Annotated[int, typer.Option(help="how many events to send")] = 3000,
    days: Annotated[int, typer.Option(help="spread event times over the last N days")] = 3,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same events)")] = 7,
) -> None:
    """Send a realistic e-commerce event stream to events.raw (page views, products, sign-ups, orders)."""
    from flywheel.producer import Producer
    from flywheel.runtime.topics import ensure_topics
    from flywheel.sample import journeys

    settings = _settings()
    ensure_topics(settings)
    n = 0
    with Producer(settings.kafka_bootstrap, topic=settings.topics.raw, source="sample") as producer:
        for message in journeys(events, seed=seed, days=days):
            producer.send(message)
            n += 1
    typer.echo(f"sent {n} events to {settings.topics.raw} at {settings.kafka_bootstrap}")


dlq_cli = typer.Typer(help="The dead-letter queue: rejected events (flywheel.invalid_events) and their replay.")
cli.add_typer(dlq_cli, name="dlq")


@dlq_cli.command("replay")
def dlq_replay(
    since: Annotated[str | None, typer.Option(help="received at or after: a time (2026-11-30T08:00, UTC unless "
                                                   "it says otherwise) or a duration back from now (2h, 7d)")] = None,
    until: Annotated[str | None, typer.Option(help="received before: a time or a duration back from now")] = None,
    reason: Annotated[str | None, typer.Option(help="only events with a reason containing this text "
                                                    "(case-insensitive), e.g. 'Checkout Started'")] = None,
    source: Annotated[str | None, typer.Option(help="only events from this source (column `source`)")] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many, oldest first")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be replayed; send nothing")] = False,
) -> None:
    """Send rejected events back through validation, after fixing the tracking plan (restart the workers
    with it first) or the client. Each goes to events.raw with its original bytes, key, source and
    receivedAt; it is counted as received again, and as valid — or invalid, rejected again, its DLQ row
    naming the original in `replay_of`. Replaying the same events twice counts them once. Rows ClickHouse
    refused (origin sink:…) are not events and are never replayed."""
    from datetime import UTC, datetime

    from flywheel import dlq
    from flywheel.query import QueryError

    settings = _settings()
    now = datetime.now(UTC)
    try:
        start = dlq.when(since, now=now) if since else None
        end = dlq.when(until, now=now) if until else None
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        query = _query(settings)
        rejected = dlq.select(lambda q: query(q)[1], since=start, until=end, reason=reason, source=source,
                              limit=limit)
    except QueryError as exc:
        _fail(f"could not read flywheel.invalid_events: {exc}")
    for line in dlq.summary(rejected):
        typer.echo(line)
    if dry_run or not rejected:
        return
    try:
        sent = dlq.replay(settings, rejected)
    except Exception as exc:  # kafka-python raises its own errors: say which broker, keep the message
        _fail(f"replay to {settings.topics.raw} at {settings.kafka_bootstrap} failed: {exc}; nothing is lost — "
              f"the rejected events stay in flywheel.invalid_events, and replaying again counts each once")
    typer.echo(f"replayed {sent:,} events to {settings.topics.raw}; watch flywheel_events_replayed_total "
               f"(`flywheel status`), and invalid_events WHERE replay_of != '' for any rejected again")


persons_cli = typer.Typer(help="Persons: erasure requests.")
cli.add_typer(persons_cli, name="persons")


@persons_cli.command("forget")
def persons_forget(
    person_id: Annotated[str, typer.Argument(metavar="ID", help="a user id, or any id linked to one")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be forgotten; change nothing")] = False,
    wait: Annotated[float, typer.Option(help="seconds to wait for the worker's confirmation")] = 120.0,
) -> None:
    """Forget a person (an erasure request): every id of theirs, their links, dedup entries and state in
    the stream's tables (changelog tombstones), their rows in ClickHouse (events, identity, rejected
    events naming their ids), and their place in every metric cell — open ones through their state,
    closed ones republished one lower. `forgotten` on identity.changes tells services. Needs a running
    worker. Run it once their traffic has stopped; running it again is harmless."""
    from flywheel import persons
    from flywheel.metrics.definitions import MetricsError
    from flywheel.query import QueryError

    settings = _settings()
    query = _query(settings)
    try:
        person = persons.find(lambda q: query(q)[1], person_id, _in_force(settings))
    except (MetricsError, QueryError) as exc:
        _fail(str(exc))
    if person is None:  # never seen, or forgotten already: the request is honoured either way
        typer.echo(f"no events or links of {person_id!r} in ClickHouse: nothing to forget")
        return
    named = f" ({person_id} is one of their ids)" if person.person_id != person_id else ""
    typer.echo(f"person {person.person_id}{named}: {len(person.ids)} ids, {len(person.events):,} events, "
               f"counted in {sum(map(len, person.cells.values())):,} metric cells")
    if dry_run:
        typer.echo("ids: " + ", ".join(person.ids))
        return
    request = persons.request_id()
    try:
        confirmed = persons.send(settings, person, request, wait=wait, on_wait=lambda m: typer.echo(m, err=True))
    except Exception as exc:  # kafka-python's errors: say where
        _fail(f"could not send the forget request to Kafka at {settings.kafka_bootstrap}: {exc}; nothing was "
              "deleted from ClickHouse — run it again")
    if not confirmed:
        _fail(f"no confirmation from a worker within {wait:.0f} s (is one running? `flywheel status`): the "
              f"request {request} waits in Kafka and applies when one runs; ClickHouse rows were not deleted "
              "— run the command again once it has")
    typer.echo(f"the stream forgot them (request {request}); deleting their rows from ClickHouse")
    try:
        pending = persons.delete(lambda q: query(q)[1], person, wait=wait)
    except QueryError as exc:
        _fail(f"deleting from ClickHouse failed: {exc}; run the command again")
    if pending:
        _fail(f"ClickHouse is still deleting ({len(pending)} mutations running): check system.mutations", 1)
    typer.echo(f"forgotten: {person.person_id} ({len(person.ids)} ids, {len(person.events):,} events)")


metrics_cli = typer.Typer(help="Metric definitions: the stored set in force, the metrics file (FLYWHEEL_METRICS) as "
                                "the code path into it, and the oracle check.")
cli.add_typer(metrics_cli, name="metrics")


@metrics_cli.command("check")
def metrics_check(
    path: Annotated[Path | None, typer.Argument(help="metrics file; default FLYWHEEL_METRICS")] = None,
) -> None:
    """Validate a metrics file and print what it defines (the worker does the same at start)."""
    from flywheel.metrics.alerts import describe as describe_alert
    from flywheel.metrics.definitions import MetricsError, load_metrics
    from flywheel.metrics.segments import describe_segment
    from flywheel.web.webhooks import problems as webhook_problems

    path = path or _settings().metrics
    try:
        m = load_metrics(path)
    except MetricsError as exc:
        _fail(str(exc))
    for f in m.funnels:
        steps = " → ".join(s.event + (f" {dict(s.where)}" if s.where else "") for s in f.steps)
        typer.echo(f"funnel {f.name} (version {f.version}): {steps} within {f.window_ms // 1000} s")
    for r in m.retention:
        typer.echo(f"retention {r.name} (version {r.version}): cohort {r.cohort.event or 'any'}, "
                   f"return {r.returning.event or 'any'}, {r.horizon} {r.period}s")
    for seg in m.segments:
        typer.echo(f"segment {seg.name} (version {seg.version}): {describe_segment(seg)}")
    if m.lifecycle is not None:
        typer.echo(f"lifecycle (version {m.lifecycle.version}): new / returning / resurrecting / dormant per "
                   f"{m.lifecycle.period}")
    for a in m.alerts:
        typer.echo(f"alert {a.name} (version {a.version}): {describe_alert(a)}")
    for e in m.experiments:
        split = ", ".join(f"{name} {share:g}" for name, share in e.variations)
        metrics = ", ".join(f"{x.name} ({x.kind}{', guardrail' if x.guardrail else ''})" for x in e.metrics)
        typer.echo(f"experiment {e.name} (version {e.version}): exposure {e.exposure_event} with "
                   f"{e.experiment_property}={e.experiment_id}; variations {split} (control {e.control}); "
                   f"metrics {metrics}; min {e.min_sample} persons per variation"
                   + (f"; CUPED over {e.cuped_ms // 1000} s before the exposure" if e.cuped_ms else ""))
    wrong = webhook_problems(m.alerts, _settings().alert_webhooks)
    if wrong:  # the worker refuses to start with these
        _fail("alerts cannot notify:\n  " + "\n  ".join(wrong))
    typer.echo(f"lateness {m.lateness_ms // 1000} s; a person keeps {m.horizon_days} days of history")


def _author() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user name in the environment (a container): the host says enough
        return f"cli@{socket.gethostname()}"


@metrics_cli.command("export")
def metrics_export(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here instead of stdout")] = None,
) -> None:
    """The stored definitions in force, as a metrics file (YAML): edit it, keep it in git, `import` it back."""
    import yaml

    from flywheel.registry import StoreUnavailable, read

    settings = _settings()
    try:
        stored = read(settings)
    except StoreUnavailable as exc:
        _fail(str(exc))
    if stored.empty:
        _fail(f"nothing stored yet in {settings.topics.definitions}: workers use the metrics file "
              f"({settings.metrics}) until their first start stores it")
    text = (f"# stored definitions, revision {stored.revision} of {settings.topics.definitions}\n"
            + yaml.safe_dump(stored.mapping(), sort_keys=False, allow_unicode=True))
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote revision {stored.revision} to {out}", err=True)


@metrics_cli.command("import")
def metrics_import(
    path: Annotated[Path, typer.Argument(help="a metrics file")],
    keep_others: Annotated[bool, typer.Option(
        "--keep-others", help="add and change what the file defines, delete nothing it leaves out")] = False,
    author: Annotated[str | None, typer.Option(help="recorded as who made the change; default user@host")] = None,
    comment: Annotated[str, typer.Option(help="recorded with the change")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the changes, store nothing")] = False,
) -> None:
    """Put a metrics file in force: every definition it adds or changes, and — unless --keep-others — the
    deletion of every stored one it leaves out (those made in the UI too). Checked first; recorded with
    who and when (flywheel.definition_changes). Running workers take it up without a restart; a new
    condition's history is backfilled from ClickHouse (README "Definitions")."""
    from flywheel.metrics.definitions import MetricsError, read_metrics_file
    from flywheel.registry import StoreUnavailable, changes_for, write

    settings = _settings()
    try:
        new = read_metrics_file(path)
        stored, changes = changes_for(settings, new, author=author or _author(), via="cli",
                                      comment=comment or f"flywheel metrics import {path.name}",
                                      keep_others=keep_others)
    except (MetricsError, StoreUnavailable) as exc:
        _fail(str(exc))
    if not changes:
        typer.echo(f"nothing to change: {path} equals the stored definitions (revision {stored.revision})")
        return
    for c in changes:
        what = "delete" if c.spec is None else ("add" if c.before is None else "change")
        typer.echo(f"{what} {c.key}" + (f" (version {c.version})" if c.spec is not None else ""))
    if dry_run:
        typer.echo("dry run: nothing stored")
        return
    try:
        revision = write(settings, changes)
    except Exception as exc:  # kafka-python's errors: say where
        _fail(f"could not write to {settings.topics.definitions} at {settings.kafka_bootstrap}: {exc}")
    typer.echo(f"stored: revision {revision}; running workers take it up now")


@metrics_cli.command("drop-version")
def metrics_drop_version(
    kind: Annotated[str, typer.Argument(help="funnels | retention")],
    name: Annotated[str, typer.Argument(help="the definition's name")],
    version: Annotated[str, typer.Argument(help="the version whose cells go (see flywheel.funnel_daily_versions)")],
    yes: Annotated[bool, typer.Option("--yes", help="do it (without: say what would go)")] = False,
) -> None:
    """Delete an old version's cells of a funnel or a retention from ClickHouse. A changed definition counts
    anew under its new version and keeps the old one's cells readable (flywheel.funnel_daily_versions,
    retention_daily_versions) until this. The version in force cannot be dropped."""
    from flywheel.metrics.oracle import quote
    from flywheel.query import QueryError

    tables = {"funnels": ("flywheel.funnel_partials", "funnel"), "retention": ("flywheel.retention_partials",
                                                                               "retention")}
    if kind not in tables:
        _fail(f"kind must be one of {', '.join(tables)}, not {kind!r}")
    table, column = tables[kind]
    settings = _settings()
    current = {d.name: d.version for d in getattr(_in_force(settings), kind)}
    if current.get(name) == version:
        _fail(f"{kind}/{name} version {version} is the one in force: change or delete the definition first")
    query = _query(settings)
    where = f"{column} = {quote(name)} AND definition_version = {quote(version)}"
    try:
        rows = int(query(f"SELECT count() FROM {table} WHERE {where}")[1][0][0])
        if not rows:
            _fail(f"no cells of {kind}/{name} version {version} (versions: SELECT DISTINCT definition_version FROM "
                  f"{table} WHERE {column} = {quote(name)})")
        if not yes:
            typer.echo(f"{rows:,} rows of {kind}/{name} version {version} would be deleted: add --yes")
            return
        query(f"ALTER TABLE {table} DELETE WHERE {where} SETTINGS mutations_sync = 1")
    except QueryError as exc:
        _fail(str(exc))
    typer.echo(f"deleted {rows:,} rows of {kind}/{name} version {version}")


@metrics_cli.command("verify")
def metrics_verify() -> None:
    """Compare the live views with ClickHouse's own functions over every event (metrics/oracle.py).

    funnel_daily vs windowFunnel(W, 'strict_once'), retention_daily vs retention(...),
    active_users_daily vs uniqExact, lifecycle_daily vs each person's active periods, segment_members
    vs each segment's conditions now, experiment_stats vs each exposed person's first exposure and events
    after it — over events_resolved (non-late). Scans all events: run it to
    check, not on a schedule. Exit 1 and the differing cells when they differ (allow for events still
    in flight on a busy pipeline, and for memberships due within the last sweep interval,
    FLYWHEEL_SEGMENT_SWEEP_SECONDS).
    """
    from flywheel.metrics import verify
    from flywheel.metrics.definitions import MetricsError
    from flywheel.query import QueryError

    settings = _settings()
    query = _query(settings)
    try:
        metrics = _in_force(settings)
        diffs = verify.compare(lambda q: query(q)[1], metrics, settings.clock()())  # the workers' now
    except (MetricsError, QueryError) as exc:
        _fail(str(exc))
    for name, (view_only, oracle_only) in diffs.items():
        typer.echo(f"{name}: {len(view_only)} cells only in the view, {len(oracle_only)} only in the oracle")
        for cell in sorted(view_only)[:5]:
            typer.echo(f"  view   {cell}")
        for cell in sorted(oracle_only)[:5]:
            typer.echo(f"  oracle {cell}")
    if diffs:
        raise typer.Exit(1)
    typer.echo("funnel_daily, retention_daily, active_users_daily, lifecycle_daily, segment_members and "
               "experiment_stats equal the oracles")


segments_cli = typer.Typer(help="Segments (the metrics file's segments: and churn_risk:): sizes and members.")
cli.add_typer(segments_cli, name="segments")


@segments_cli.command("list")
def segments_list() -> None:
    """Every segment in force with its definition and its current size (flywheel.segment_members)."""
    from flywheel.metrics.definitions import MetricsError
    from flywheel.metrics.segments import describe_segment
    from flywheel.query import QueryError

    settings = _settings()
    try:
        metrics = _in_force(settings)
        _, rows = _query(settings)("SELECT segment, count() FROM flywheel.segment_members GROUP BY segment")
    except (MetricsError, QueryError) as exc:
        _fail(str(exc))
    sizes = {name: int(n) for name, n in rows}
    if not metrics.segments:
        typer.echo("no segments in the definitions in force")
    for seg in metrics.segments:
        typer.echo(f"{seg.name}\t{sizes.pop(seg.name, 0)} members\tversion {seg.version}: {describe_segment(seg)}")
    for name, n in sorted(sizes.items()):  # members of a segment no longer in the file, not yet sent away
        typer.echo(f"{name}\t{n} members\tnot in the definitions any more")


@segments_cli.command("members")
def segments_members(
    name: Annotated[str, typer.Argument(help="the segment's name")],
    fmt: Annotated[str, typer.Option("--format", help="table or csv")] = "table",
) -> None:
    """The current members of a segment: person id, userId / anonymousId, member since (UTC)."""
    import csv

    from flywheel.metrics.definitions import MetricsError
    from flywheel.metrics.oracle import quote
    from flywheel.query import QueryError

    if fmt not in ("table", "csv"):
        _fail(f"--format {fmt}: use table or csv")
    settings = _settings()
    try:
        defined = {s.name for s in _in_force(settings).segments}
        columns, rows = _query(settings)(
            "SELECT person_id, user_id, anonymous_id, since FROM flywheel.segment_members "
            f"WHERE segment = {quote(name)} ORDER BY person_id")
    except (MetricsError, QueryError) as exc:
        _fail(str(exc))
    if name not in defined and not rows:
        _fail(f"no segment {name!r} in the definitions in force and no members of one: `flywheel segments list` "
              "shows the segments")
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    for row in rows:
        typer.echo("\t".join(str(v) for v in row))
    typer.echo(f"{len(rows)} members of {name}", err=True)


alerts_cli = typer.Typer(help="Alert rules (the metrics file's alerts:): their states, and backtests over history.")
cli.add_typer(alerts_cli, name="alerts")


@alerts_cli.command("list")
def alerts_list() -> None:
    """Every rule of the metrics file, with its current state from ClickHouse's alert_states (firing or
    resolved since when; "never fired" before its first transition)."""
    from flywheel.metrics.alerts import describe
    from flywheel.metrics.definitions import MetricsError
    from flywheel.query import QueryError

    settings = _settings()
    try:
        rules = _in_force(settings).alerts
        _, rows = _query(settings)("SELECT alert, state, version, period, since, value, decided_at, late "
                                   "FROM flywheel.alert_states ORDER BY alert")
    except (MetricsError, QueryError) as exc:
        _fail(str(exc))
    states = {r[0]: r for r in rows}
    if not rules:
        typer.echo("no alerts in the definitions in force")
    for a in rules:
        row = states.get(a.name)
        if row is None:
            now = "never fired"
        else:
            _, state, version, period, since, value, decided, late = row
            older = "" if version == a.version else f" (by version {version}; the rule is {a.version} now)"
            now = (f"{state.upper()} since the {a.series.period} from {since or period}, value {value} decided "
                   f"{decided}{' late' if late else ''}{older}")
        typer.echo(f"{a.name}: {now}\n    {describe(a)}")


def _day_ms(text: str, what: str) -> int:
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"{what} {text!r}: give a date (2024-10-01) or a time (2024-10-01T12:00Z)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@alerts_cli.command("backtest")
def alerts_backtest(
    name: Annotated[str, typer.Argument(help="the rule's name")],
    start: Annotated[str, typer.Option("--from", help="first day (or time, UTC) judged")],
    end: Annotated[str, typer.Option("--to", help="day (or time, UTC) the judged periods end before")],
    every: Annotated[bool, typer.Option("--all", help="print every period's verdict, not only transitions")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Replay a rule over the history in ClickHouse: its series recomputed from the stored events (as the
    oracle does), judged period by period with the stream's own rule code, from a rule that is not firing.
    Prints when it would have fired and resolved, to tune sensitivity and min_count before enabling it.

    The stream judges a period once it closes (its end plus the grace): events that arrived later are in
    the history but were not in the live verdict, so a backtest of recent periods can differ from what fired.
    """
    import orjson

    from flywheel.metrics import alerts as rules
    from flywheel.metrics.definitions import MetricsError
    from flywheel.metrics.oracle import alert_series_sql
    from flywheel.model.clock import iso_ms
    from flywheel.query import QueryError

    settings = _settings()
    try:
        metrics = _in_force(settings)
    except MetricsError as exc:
        _fail(str(exc))
    alert = next((a for a in metrics.alerts if a.name == name), None)
    if alert is None:
        _fail(f"no alert {name!r} in the definitions in force: `flywheel alerts list` shows the rules")
    start_ms, end_ms = _day_ms(start, "--from"), _day_ms(end, "--to")
    if end_ms <= start_ms:
        _fail("--to must be after --from")
    first = alert.series.period_of(start_ms) - rules.history_needed(alert)
    try:
        _, rows = _query(settings)(alert_series_sql(alert, metrics, first, end_ms))
    except QueryError as exc:
        _fail(str(exc))
    series = rules.history_points(alert, rows, first, end_ms)
    fired = 0
    for verdict, transition in rules.backtest(alert, series, rules.periods_between(alert, start_ms, end_ms)):
        fired += transition == rules.FIRING
        if not (every or transition):
            continue
        out = {"period": iso_ms(verdict.period), "transition": transition, "breach": verdict.breach,
               "value": verdict.value, "count": verdict.count, "baseline": verdict.baseline, "lower": verdict.lower,
               "upper": verdict.upper, "score": verdict.score, "reason": verdict.reason}
        if as_json:
            typer.echo(orjson.dumps(out).decode())
        else:
            def num(x):
                return "-" if x is None else f"{x:.4g}"
            typer.echo(f"{out['period']}  {(transition or '').upper():9} value {num(verdict.value)} "
                       f"(volume {num(verdict.count)}) baseline {num(verdict.baseline)} "
                       f"bounds {num(verdict.lower)}..{num(verdict.upper)}  {verdict.reason}")
    typer.echo(f"{name}: fired {fired} times in {len(rules.periods_between(alert, start_ms, end_ms))} "
               f"{alert.series.period}s", err=True)


experiments_cli = typer.Typer(help="Experiments (the metrics file's experiments:): live results from experiment_stats.")
cli.add_typer(experiments_cli, name="experiments")


def _experiment_rows(name: str | None):
    """(the experiments asked for, a function giving each one's results from ClickHouse)."""
    from flywheel.metrics.definitions import MetricsError
    from flywheel.metrics.results import from_stats, stats_sql
    from flywheel.query import QueryError

    settings = _settings()
    try:
        experiments = _in_force(settings).experiments
    except MetricsError as exc:
        _fail(str(exc))
    if name is not None:
        experiments = tuple(e for e in experiments if e.name == name)
        if not experiments:
            _fail(f"no experiment {name!r} in the definitions in force: `flywheel experiments list` shows them")
    query = _query(settings)

    def results(e):
        try:
            return from_stats(e, query(stats_sql(e))[1])
        except QueryError as exc:
            _fail(str(exc))
    return experiments, results


@experiments_cli.command("list")
def experiments_list() -> None:
    """Every experiment of the metrics file with its exposed persons per variation and its sample-ratio check."""
    experiments, results = _experiment_rows(None)
    if not experiments:
        typer.echo(f"no experiments: in {_settings().metrics}")
    for e in experiments:
        r = results(e)
        units = ", ".join(f"{v} {n}" for v, n in r["units"].items())
        flags = [*(["SAMPLE RATIO MISMATCH"] if r["srm"]["flagged"] else []),
                 *(f"guardrail {g} violated" for g in r["guardrails_violated"])]
        typer.echo(f"{e.name}: exposed {units}; {r['excluded']} excluded{'; ' + '; '.join(flags) if flags else ''}")


@experiments_cli.command("results")
def experiments_results(
    name: Annotated[str, typer.Argument(help="the experiment's name")],
    as_json: Annotated[bool, typer.Option("--json", help="the results as one JSON object")] = False,
) -> None:
    """An experiment's live results, each variation against the control, per metric: lift (relative and
    absolute) with 95 % intervals and p-values, the anytime-valid interval (the one to act on while watching),
    chance to win and expected loss, guardrails, and the sample-ratio check (docs/design.md §11). A variation
    shows no statistics until it and the control have min_sample exposed persons. The same JSON is served at
    the admin listener's /experiments/NAME/results.
    """
    import orjson

    from flywheel.metrics.results import text

    experiments, results = _experiment_rows(name)
    r = results(experiments[0])
    typer.echo(orjson.dumps(r).decode() if as_json else text(r))


users_cli = typer.Typer(help="The UI's users (<data dir>/users.sqlite3, never in ClickHouse): viewer, editor, admin.")
cli.add_typer(users_cli, name="users")


@contextmanager
def _users() -> Iterator:
    """The users file, closed after; a refused change exits with its reason."""
    from flywheel.web.users import UserError, Users

    users = Users(_settings().data_dir)
    try:
        yield users
    except UserError as exc:
        _fail(str(exc))
    finally:
        users.close()


def _password(stdin: bool) -> str:
    if stdin:
        return sys.stdin.readline().rstrip("\n")
    return typer.prompt("password", hide_input=True, confirmation_prompt=True)


@users_cli.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="the user's name (letters, digits, . _ @ -)")],
    role: Annotated[str, typer.Option(help="viewer | editor | admin")] = "viewer",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Add a user of the UI. The first admin is made here; later ones from here or by an admin in the UI."""
    with _users() as users:
        user = users.add(name, role, _password(password_stdin))
    typer.echo(f"user {user.name} added ({user.role}) in {users.path}")


@users_cli.command("list")
def users_list() -> None:
    """The UI's users and their roles."""
    with _users() as users:
        listed = users.list()
    if not listed:
        typer.echo(f"no users yet in {users.path}: `flywheel users add NAME --role admin` makes the first admin")
    for u in listed:
        typer.echo(f"{u.name}\t{u.role}")


@users_cli.command("set-role")
def users_set_role(
    name: Annotated[str, typer.Argument()],
    role: Annotated[str, typer.Argument(help="viewer | editor | admin")],
) -> None:
    """Change a user's role (effective at their next request)."""
    with _users() as users:
        users.set_role(name, role)
    typer.echo(f"user {name} is now {role}")


@users_cli.command("set-password")
def users_set_password(
    name: Annotated[str, typer.Argument()],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
) -> None:
    """Set a user's password; their open sessions end."""
    with _users() as users:
        users.set_password(name, _password(password_stdin))
    typer.echo(f"password of {name} set; their sessions ended")


@users_cli.command("remove")
def users_remove(name: Annotated[str, typer.Argument()]) -> None:
    """Remove a user; their open sessions end."""
    with _users() as users:
        users.remove(name)
    typer.echo(f"user {name} removed")


@cli.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print /status and readiness as one JSON object")] = False,
) -> None:
    """Say how the worker is doing, from its admin listener (FLYWHEEL_ADMIN_HOST:FLYWHEEL_ADMIN_PORT):
    ready or why not, each stage's lag and failures, event rates (received, valid, invalid, late,
    duplicates, replayed), ClickHouse inserts waiting, table restore progress, state tables' keys and
    memory. Exit 0 ready, 1 not ready, 2 no answer."""
    import urllib.error
    import urllib.request

    import orjson

    settings = _settings()
    base = f"http://{settings.admin_host if settings.admin_host not in ('0.0.0.0', '::') else '127.0.0.1'}" \
           f":{settings.admin_port}"

    def get(path: str) -> dict:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return orjson.loads(r.read())
        except urllib.error.HTTPError as exc:  # 503 from /health/ready still carries the reasons
            return orjson.loads(exc.read())

    try:
        ready, doc = get("/health/ready"), get("/status")
    except (OSError, ValueError) as exc:
        _fail(f"no worker answers at {base} ({exc}): is `flywheel worker` running with these settings?", 2)
    if as_json:
        typer.echo(orjson.dumps({"ready": ready, "status": doc}, option=orjson.OPT_INDENT_2).decode())
    else:
        from flywheel.query import format_table

        typer.echo(f"worker at {base}: " + ("ready" if ready["ready"] else "NOT READY: " + "; ".join(ready["reasons"])))
        rows = [[name, s["topic"], f"{s['lag']:,}",
                 f"failing for {_ago(s['failing']['since'])}, {s['failing']['attempts']} attempts: "
                 f"{s['failing']['error']}" if s["failing"] else "-"] for name, s in doc["stages"].items()]
        typer.echo(format_table(["stage", "topic", "lag", "failing"], rows, "table"))
        r = doc["rates_per_s"]
        if r:
            share = f" ({doc['invalid_share']:.1%} of received)" if doc["invalid_share"] is not None else ""
            typer.echo(f"events/s: received {r['received']:,}, valid {r['valid']:,}, invalid {r['invalid']:,}{share}, "
                       f"late {r['late']:,}, duplicates {r['duplicates']:,}, replayed {r['replayed']:,}")
        blocked = doc["sink_blocked_s"]
        typer.echo("clickhouse inserts: " + (", ".join(f"{t} waiting {s:.0f} s" for t, s in blocked.items())
                                             if blocked else "ok"))
        if doc["restoring"]:
            left = (f"{t} {n:,} changelog records left" for t, n in doc["restoring"].items())
            typer.echo("restoring: " + ", ".join(left))
        tables = doc.get("tables") or {}
        if tables:
            def mb(n: int | None) -> str:
                return "-" if n is None else f"{n / 2**20:,.1f}"

            typer.echo(format_table(
                ["table", "keys", "memtables MB", "block cache MB", "index+filters MB", "disk MB"],
                [[name, f"{t['keys']:,}", mb(t.get("memtables")), mb(t.get("block_cache")),
                  mb(t.get("index_filters")), mb(t.get("sst_files"))] for name, t in tables.items()], "table"))
    raise typer.Exit(0 if ready["ready"] else 1)


def _ago(epoch: float) -> str:
    import time

    return f"{time.time() - epoch:.0f} s"


@cli.command("config")
def show_config() -> None:
    """Print the effective configuration (defaults < flywheel.yaml / FLYWHEEL_CONFIG < FLYWHEEL_* env)."""
    settings = _settings()
    for name, value in settings.model_dump().items():
        typer.echo(f"{name}: {value}")


def _broker(data_dir: Path | None, port: int | None) -> devkafka.Broker:  # noqa: F821
    from flywheel import devkafka

    settings = _settings()
    default_port = int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
    return devkafka.Broker(data_dir=data_dir or settings.data_dir / "kafka", port=port or default_port)


@kafka_cli.command("start")
def kafka_start(
    data_dir: Annotated[Path | None, typer.Option(help="broker files; default <FLYWHEEL_DATA_DIR>/kafka")] = None,
    port: Annotated[int | None, typer.Option(help="listener port; default from FLYWHEEL_KAFKA_BOOTSTRAP")] = None,
) -> None:
    """Start the broker in the background (no-op if running); return once it answers metadata requests."""
    from flywheel import devkafka

    broker = _broker(data_dir, port)
    try:
        pid = devkafka.start(broker)
    except devkafka.KafkaError as exc:
        _fail(str(exc))
    typer.echo(f"Kafka {devkafka.kafka_version()} ready at {broker.bootstrap} (pid {pid}, files in {broker.data_dir})")


@kafka_cli.command("stop")
def kafka_stop(
    data_dir: Annotated[Path | None, typer.Option(help="broker files; default <FLYWHEEL_DATA_DIR>/kafka")] = None,
    port: Annotated[int | None, typer.Option(help="listener port; default from FLYWHEEL_KAFKA_BOOTSTRAP")] = None,
) -> None:
    """Stop the broker (SIGTERM, then SIGKILL after 30 s)."""
    from flywheel import devkafka

    stopped = devkafka.stop(_broker(data_dir, port))
    typer.echo("Kafka stopped" if stopped else "Kafka was not running")


@kafka_cli.command("status")
def kafka_status(
    data_dir: Annotated[Path | None, typer.Option(help="broker files; default <FLYWHEEL_DATA_DIR>/kafka")] = None,
    port: Annotated[int | None, typer.Option(help="listener port; default from FLYWHEEL_KAFKA_BOOTSTRAP")] = None,
) -> None:
    """Say whether the local broker runs; exit 1 if not."""
    from flywheel import devkafka

    broker = _broker(data_dir, port)
    pid = devkafka.running_pid(broker)
    if pid is None:
        typer.echo("Kafka is not running")
        raise typer.Exit(1)
    typer.echo(f"Kafka running at {broker.bootstrap} (pid {pid})")


def main() -> None:
    cli(prog_name="flywheel")


if __name__ == "__main__":
    sys.exit(main())
