"""Start-up of `flywheel worker`: check the inputs, prepare ClickHouse and Kafka, run the Faust worker."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flywheel import clickhouse, paths
from flywheel.clickhouse import ClickHouseBusy, migrate
from flywheel.clickhouse.owner import AnotherWorker, advertise
from flywheel.config import Settings
from flywheel.observability import logging_config, setup_logging

log = logging.getLogger(__name__)

BUSY_WAIT_SECONDS = 300.0
GC_THRESHOLD = 200_000


def run(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_format)
    from faust import Worker

    from flywheel import registry
    from flywheel.model.plan import load_plan
    from flywheel.runtime.app import create_worker
    from flywheel.runtime.topics import ensure_topics

    load_plan(settings.tracking_plan)  # fail before touching anything if the tracking plan is wrong
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    token = None if settings.clickhouse_url else claim(settings)
    ch = open_clickhouse(settings)
    migrated(ch)
    ensure_topics(settings)
    # the definitions in force: the stored ones — or, on a first start, the metrics file's, stored now
    # (docs/design.md §13); ClickHouse's audit trail tells a first start from a lost store
    try:
        audited = int(ch.rows("SELECT count() FROM flywheel.definition_changes")[1][0][0])
        definitions = _definitions(settings, registry, audited=audited)
    except BaseException:
        ch.close()
        raise
    log.info("definitions in force: %s", definitions.describe())
    parts = create_worker(settings, ch, sql_token=token, definitions=definitions)
    # A batch allocates tens of thousands of objects that live until it ends (states, records, rows). With
    # CPython's default thresholds (700, 10, 10) the cyclic collector ran all the time over them, and over the
    # start-up heap: a quarter of the worker's CPU (make bench: ~230 → ~160 µs per event). The start-up heap
    # is frozen out of collections; young objects are collected every 200,000 net allocations (refcounting
    # frees almost everything before that: the collector is only for cycles).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 10)
    tty = sys.stdout.isatty()
    worker = Worker(parts.app, *parts.services, loglevel=settings.log_level.upper(), quiet=not tty,
                    logging_config=logging_config(settings.log_level, settings.log_format))
    if not tty:
        worker.spinner = None  # it writes cursor codes (ESC[?25l) even into a file
    code = 1
    try:
        with _profiled(settings.profile):
            worker.execute_from_commandline()
    except SystemExit as stop:  # how Faust's worker ends, once it has stopped every service
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        ch.close()
    # Leave without the interpreter's teardown: chdb's global shutdown at exit crashed about one SIGTERM in
    # three (SIGSEGV, exit 139: "ShutdownTablesThreadPool is not initialized"). Everything is written by now:
    # Faust stopped its services (offsets committed, stores closed), ClickHouse closed, logs flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def claim(settings: Settings) -> str:
    """Name this process in <data_dir>/worker.json, first thing (from then on `flywheel sql` waits for its /sql
    instead of opening the directory), and return the token /sql takes; exit if another process holds it."""
    try:
        return advertise(settings.data_dir, host=settings.admin_host, port=settings.admin_port)
    except AnotherWorker as exc:
        log.error("%s", exc)
        sys.exit(1)


def migrated(ch) -> None:
    applied = migrate.apply(ch, paths.sql_dir() / "migrations")
    log.info("ClickHouse: %s (%s)", ch.label, f"applied {applied}" if applied else "schema up to date")


def _definitions(settings: Settings, registry, *, audited: int, sleep=time.sleep):
    """registry.seed, waiting for Kafka as long as it takes (a worker started before the broker, as compose
    may do), one line when it starts waiting and one when Kafka answers."""
    waited = False
    while True:
        try:
            definitions = registry.seed(settings, audited=audited)
        except registry.StoreUnavailable as exc:
            if not waited:
                log.warning("waiting for Kafka to read the stored definitions: %s", exc)
                waited = True
            sleep(2.0)
            continue
        if waited:
            log.info("Kafka answered: stored definitions read")
        return definitions


def open_clickhouse(settings: Settings, *, wait: float = BUSY_WAIT_SECONDS, clock=time.monotonic,
                     sleep=time.sleep):
    """Embedded ClickHouse may be held for a moment by a command that opened it just before we
    advertised ourselves (`flywheel sql`, `migrate`, `dlq replay`), and a store's may not be up yet
    (started together): wait for it, saying so."""
    deadline, said = clock() + wait, None
    while True:
        try:
            return clickhouse.connect(url=settings.clickhouse_url, data_dir=settings.clickhouse_dir)
        except ClickHouseBusy as exc:
            now = clock()
            if now >= deadline:
                raise ClickHouseBusy(f"{exc} — waited {wait:.0f} s; stop the process holding it (fuser -v "
                                     f"{settings.clickhouse_dir}/status names it) and start again") from exc
            if said is None or now - said >= 10:
                log.warning("waiting for ClickHouse: %s", exc)
                said = now
            sleep(0.2)


@contextmanager
def _profiled(path: Path | None) -> Iterator[None]:
    """FLYWHEEL_PROFILE=<file>: sample the worker's main thread (event loop included) with pyinstrument
    and save the session there when the worker stops (SIGTERM/SIGINT; a SIGKILL writes nothing).
    Render it with `pyinstrument --load <file>`; bench/pipeline.py uses this."""
    if path is None:
        yield
        return
    from pyinstrument import Profiler  # the `bench` extra

    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    try:
        yield
    finally:
        session = profiler.stop()
        session.save(str(path))
        log.info("profile of the worker written to %s (pyinstrument --load %s)", path, path)
