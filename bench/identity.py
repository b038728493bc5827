"""Identity stage measurements (issue #4): numbers for the note, not pass/fail.

    make bench-identity                        # = .venv/bin/python bench/identity.py
    .venv/bin/python bench/identity.py --events 50000 --ids 10000 --repeat 3

1. Pure identity stage: the ingest stage's identity step (flywheel/stages/ingest.py Ingest._resolve_identity) without
   Kafka: lookup key, table value b"<user>\\0<origin>", flywheel.identity.resolve, the first link
   written to the table, the identity.changes record and merge marker built and serialised (not
   sent), over the validated events of flywheel.sample.journeys with a dict as the identity table.
   Also flywheel.identity.IdentityMap.apply (the model the tests use).
2. In-process ingest cost per event: validate alone; validate + dedup (dict) + identity + orjson.dumps
   of the forwarded event + the Prometheus counters the stage bumps, i.e. the ingest stage's own work
   without Faust and Kafka.
   Both report CPU time (time.process_time) per event, the best of --repeat passes (the machine may
   be shared; CPU time is what a busier machine inflates least), and the matching events/s on one core.
3. Identity table bytes per distinct id, measured on a real worker: a local Kafka (flywheel.devkafka)
   in a temporary directory, --ids identify calls (one new anonymous id each, UUIDs as analytics.js
   makes them, user ids `user-NNNNNNN`) into events.raw (default topic names: the stored origin is
   `events.raw/<partition>@<offset>`), one `flywheel worker` until flywheel.identity_map holds them all
   (or --budget runs out: then the entries present are measured and the report says INCOMPLETE), then:
     a. the table's changelog topic read back with a consumer: key + value (+ header) bytes per record;
     b. the changelog's log segment files (*.log) on the broker's disk: what Kafka stores, with record
        and batch overhead, before compaction;
     c. the worker's RocksDB files for the table (faust/v1/tables/identity-*.db) after a clean stop:
        SST + WAL, and all files (MANIFEST, OPTIONS, info LOG: a fixed cost per partition).
   The same three for the dedup table (message-ids: one entry per distinct messageId) for scale.

Writes bench/results/identity-<time>.json and .txt (bench/results/ is not committed) and prints the text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from random import Random
from typing import Any

import orjson
from flywheel import devkafka, query
from flywheel import observability as obs
from flywheel.config import Settings
from flywheel.model import identity
from flywheel.model.clock import DAY_MS
from flywheel.model.envelope import Limits
from flywheel.model.plan import load_plan
from flywheel.model.validate import Invalid, Raw, validate
from flywheel.sample import journeys
from flywheel.stages.dedup import Dedup
from flywheel.stages.tables import MemoryTable, Writes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PARTITIONS = 8


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the stream


def raw_stream(n: int, seed: int) -> list[Raw]:
    """n sample events as the ingest stage receives them: bytes, source, receivedAt, origin."""
    from flywheel.model.envelope import kafka_key
    from kafka.partitioner import murmur2

    received = datetime.now(UTC)
    out = []
    offsets = [0] * PARTITIONS
    for message in journeys(n, seed=seed, days=7):
        key = kafka_key(message).encode()
        partition = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS  # Kafka's default partitioner
        out.append(Raw(value=orjson.dumps(message), source="bench", received_at=received,
                       topic="events.raw", partition=partition, offset=offsets[partition]))
        offsets[partition] += 1
    return out


# --------------------------------------------------------------------------- the stages, as the ingest stage runs them


def identity_step(ev: dict, origin: str, table: dict[bytes, bytes]) -> int:
    """Ingest._resolve_identity (stages/ingest.py) without the sends: 1 if a link was made."""
    pair = identity.linked_ids(ev)
    lookup = pair[0] if pair else ("" if ev["userId"] else ev["anonymousId"] or ev["previousId"])
    entry = table.get(lookup.encode()) if lookup else None
    linked_user, _, linked_by = entry.decode().partition("\x00") if entry is not None else (None, "", None)
    result = identity.resolve(ev, linked_user, linked_by=linked_by, origin=origin)
    ev["personId"] = result.person_id
    if result.link is not None:
        anon, user = result.link.anonymous_id, result.link.user_id
        table[anon.encode()] = f"{user}\x00{origin}".encode()
        orjson.dumps({"type": "link", "anonymousId": anon, "userId": user,
                      "messageId": ev["messageId"], "timestamp": ev["timestamp"]})
        orjson.dumps({"type": "merge", "from": anon, "into": user,
                      "messageId": ev["messageId"], "timestamp": ev["timestamp"]})
        return 1
    if result.conflict is not None:
        c = result.conflict
        orjson.dumps({"type": "conflict", "anonymousId": c.anonymous_id, "linkedTo": c.linked_to,
                      "refused": c.refused, "messageId": ev["messageId"], "timestamp": ev["timestamp"]})
    return 0


def ingest_step(raw: Raw, plan, limits: Limits, first_seen: dict[bytes, bytes], table: dict[bytes, bytes]) -> None:
    """The ingest stage's work for one record (stages/ingest.py) without Faust and Kafka."""
    obs.RECEIVED.labels(raw.source).inc()
    outcome = validate(raw, plan, limits)
    if isinstance(outcome, Invalid):
        obs.INVALID.labels(raw.source).inc()
        orjson.dumps(outcome.dlq_record())
        return
    obs.VALID.labels(raw.source).inc()
    ev = outcome.event
    mid = ev["messageId"].encode()
    here = raw.origin.encode()
    seen = first_seen.get(mid)
    if seen is None:
        first_seen[mid] = here
    elif seen != here:
        obs.DUPLICATES.labels(raw.source).inc()
        return
    if identity_step(ev, raw.origin, table):
        obs.IDENTITY_LINKS.inc()
    orjson.dumps(ev)


class _NoOutbox:
    def add(self, topic: str, key: bytes | None, value: bytes | None, *, partition: int | None = None) -> None:
        pass


def dedup_pass(ids: list[bytes], days: int, horizon: int, batch: int, bounded: bool) -> None:
    """The dedup table's work for `ids` arriving evenly over `days` days, `batch` records at a time, on
    one partition: the bounded table (stages/dedup.py: clock, generations, sweeps) or the unbounded
    one it replaced (one bare key per messageId, a get and a put). MemoryTable's scans sort the
    partition's keys where RocksDB seeks: the sweep costs less on a worker than here."""
    table = MemoryTable("message-ids")
    dedup = Dedup(table, horizon)
    origin = b"events.raw/0@1"
    for start in range(0, len(ids), batch):
        writes = Writes(table, _NoOutbox())
        chunk = ids[start:start + batch]
        received = int(start / len(ids) * days * DAY_MS)
        if bounded:
            b = dedup.batch(writes)
            for mid in chunk:
                b.arrived(0, received)
                key, seen = b.seen(0, mid)
                if seen is None:
                    b.remember(0, key, origin)
            b.finish()
        else:
            for mid in chunk:
                if writes.get(0, mid) is None:
                    writes.put(0, mid, origin)
        writes.apply({})
        if bounded:
            b.landed()


def best_of(repeat: int, n: int, run: Callable[[], Any]) -> dict[str, float]:
    """CPU and wall time of the fastest of `repeat` passes over n events."""
    cpu, wall = [], []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        run()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    best = min(cpu)
    return {"cpu_us_per_event": round(best / n * 1e6, 2), "events_per_s_one_core": round(n / best),
            "wall_us_per_event": round(min(wall) / n * 1e6, 2), "passes": repeat}


def in_process(n_events: int, repeat: int, seed: int) -> dict[str, Any]:
    plan = load_plan(Settings().tracking_plan)
    limits = Limits()
    raws = raw_stream(n_events, seed)
    outcomes = [validate(r, plan, limits) for r in raws]
    valid = [(o.event, r.origin) for o, r in zip(outcomes, raws, strict=True) if not isinstance(o, Invalid)]
    if len(valid) != len(raws):
        raise SystemExit(f"{len(raws) - len(valid)} sample events are invalid: the sample or the plan changed")

    def pure_identity() -> None:
        table: dict[bytes, bytes] = {}
        for ev, origin in valid:
            identity_step(ev, origin, table)

    def model() -> None:
        ids = identity.IdentityMap()
        for ev, _ in valid:
            ids.apply(ev)

    def validate_only() -> None:
        for r in raws:
            validate(r, plan, limits)

    def ingest() -> None:
        first_seen: dict[bytes, bytes] = {}
        table: dict[bytes, bytes] = {}
        for r in raws:
            ingest_step(r, plan, limits, first_seen, table)

    # 1% retries, as SDKs send them; 30 days, the table expiring through 4 horizons of 7 days
    rng = Random(seed)
    mids = [uuid.UUID(int=rng.getrandbits(128)).hex.encode() for _ in range(n_events)]
    mids = [m for mid in mids for m in ([mid, mid] if rng.random() < 0.01 else [mid])]

    table: dict[bytes, bytes] = {}
    links = sum(identity_step(dict(ev), origin, table) for ev, origin in valid)
    linking = sum(1 for ev, _ in valid if identity.linked_ids(ev))
    return {
        "events": len(valid),
        "distinct_anonymous_ids": len({ev["anonymousId"] for ev, _ in valid if ev["anonymousId"]}),
        "events_carrying_a_link": linking,
        "first_links": links,
        "identity_stage": best_of(repeat, len(valid), pure_identity),
        "identity_model_apply": best_of(repeat, len(valid), model),
        "validate": best_of(repeat, len(raws), validate_only),
        "validate_dedup_identity_dumps_metrics": best_of(repeat, len(raws), ingest),
        "dedup_unbounded": best_of(repeat, len(mids), lambda: dedup_pass(mids, 30, 7, 1000, False)),
        "dedup_bounded": best_of(repeat, len(mids), lambda: dedup_pass(mids, 30, 7, 1000, True)),
    }


# --------------------------------------------------------------------------- bytes per distinct id


def read_changelog(bootstrap: str, topic: str) -> dict[str, Any]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        records, keys, key_bytes, value_bytes, header_bytes = 0, set(), 0, 0, 0
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise SystemExit(f"could not read {topic} to its end")
            for batch in consumer.poll(timeout_ms=500).values():
                for r in batch:
                    records += 1
                    keys.add(r.key)
                    key_bytes += len(r.key or b"")
                    value_bytes += len(r.value or b"")
                    header_bytes += sum(len(k) + len(v or b"") for k, v in r.headers or ())
        return {"records": records, "distinct_keys": len(keys), "key_bytes": key_bytes, "value_bytes": value_bytes,
                "header_bytes": header_bytes}
    finally:
        consumer.close()


def files_bytes(paths: list[Path]) -> dict[str, int]:
    out = {"sst": 0, "wal": 0, "other": 0}
    for path in paths:
        for f in path.rglob("*"):
            if f.is_file():
                kind = "sst" if f.suffix == ".sst" else "wal" if f.suffix == ".log" else "other"
                out[kind] += f.stat().st_size
    return out


def send_identifies(bootstrap: str, n: int, seed: int) -> None:
    from flywheel.producer import Producer

    rng = Random(seed)
    with Producer(bootstrap, topic="events.raw", source="bench", linger_ms=50, batch_size=512 * 1024,
                  max_in_flight_requests_per_connection=5) as producer:
        for i in range(n):
            producer.send({"type": "identify", "anonymousId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                           "userId": f"user-{i:07d}", "messageId": str(uuid.UUID(int=rng.getrandbits(128)))})


def table_bytes(n_ids: int, seed: int, deadline: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="flywheel-bench-identity-"))
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
    settings = Settings(kafka_bootstrap=broker.bootstrap, data_dir=tmp / "worker",
                        http_port=free_port(), admin_port=free_port(),
                        partitions=PARTITIONS)
    proc = None
    try:
        log(f"starting Kafka at {broker.bootstrap} in {tmp}")
        devkafka.start(broker)
        from flywheel.runtime.topics import ensure_topics

        ensure_topics(settings)
        log(f"sending {n_ids} identify calls (one new anonymous id each)")
        send_identifies(broker.bootstrap, n_ids, seed)
        settings.data_dir.mkdir(parents=True)
        worker_log = settings.data_dir / "worker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")} | settings.as_env()
        with open(worker_log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "worker"], env=env, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log("worker started; waiting until flywheel.identity_map holds every link")
        started = time.monotonic()
        ready = None
        linked = 0
        while linked < n_ids and time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = "\n".join(worker_log.read_text(errors="replace").splitlines()[-30:])
                raise SystemExit(f"the worker exited with {proc.returncode} after {linked} of {n_ids} links\n{tail}")
            time.sleep(0.5)
            if ready is None:
                # Not before: query.run opens the data directory itself while no worker serves /sql, and
                # would hold it just when the starting worker opens it.
                if "Worker ready" in worker_log.read_text(errors="replace"):
                    ready = time.monotonic()
                continue
            try:
                linked = query.run(settings, "SELECT count() FROM flywheel.identity_map", timeout=60)[1][0][0]
            except (query.QueryError, OSError):
                linked = 0
        done = time.monotonic()
        seconds = done - started
        load = [round(v, 2) for v in os.getloadavg()]
        if linked < n_ids:
            log(f"the --budget ran out with {linked} of {n_ids} links in ClickHouse: measuring what is there")
        else:
            log(f"{linked} links in ClickHouse {seconds:.1f} s after the worker started; stopping it")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        tables = settings.data_dir / "faust" / "v1" / "tables"
        result: dict[str, Any] = {
            "ids": n_ids, "linked": linked, "complete": linked >= n_ids, "worker_seconds": round(seconds, 1),
            # Not the point of this bench: every record links (5 records produced per event), machine shared.
            "links_per_s_after_ready": round(linked / (done - ready)) if ready else None, "loadavg_at_end": load,
        }
        for table in ("identity", "message-ids"):
            topic = f"{settings.app_id}-{table}-changelog"
            changelog = read_changelog(broker.bootstrap, topic)
            per = max(1, changelog["distinct_keys"])  # entries the table holds (all of them if complete)
            segments = sum(f.stat().st_size for f in (broker.data_dir / "logs").glob(f"{topic}-*/*.log"))
            rocks = files_bytes(sorted(tables.glob(f"{table}-*.db")))
            stored = changelog["key_bytes"] + changelog["value_bytes"]
            result[table] = {
                "entries": per,
                "changelog": changelog,
                "changelog_key_value_bytes_per_entry": round(stored / per, 1),
                "changelog_with_headers_bytes_per_entry": round((stored + changelog["header_bytes"]) / per, 1),
                "changelog_segment_files_bytes": segments,
                "changelog_segment_bytes_per_entry": round(segments / per, 1),
                "rocksdb_files_bytes": rocks,
                "rocksdb_sst_wal_bytes_per_entry": round((rocks["sst"] + rocks["wal"]) / per, 1),
                "rocksdb_all_files_bytes_per_entry": round(sum(rocks.values()) / per, 1),
            }
        sample = read_sample_value(broker.bootstrap, f"{settings.app_id}-identity-changelog")
        result["identity"]["sample_record"] = sample
        return result
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        log("stopping Kafka")
        devkafka.stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)


def read_sample_value(bootstrap: str, topic: str) -> dict[str, Any]:
    """One record of the changelog, to show what an entry is made of."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        for p in sorted(consumer.partitions_for_topic(topic) or ()):
            tp = TopicPartition(topic, p)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            for batch in consumer.poll(timeout_ms=5000).values():
                if batch:
                    r = batch[0]
                    return {"key": r.key.decode(errors="replace"), "value": r.value.decode(errors="replace"),
                            "key_bytes": len(r.key), "value_bytes": len(r.value),
                            "headers": [(k, (v or b"").decode(errors="replace")) for k, v in r.headers or ()]}
        return {}
    finally:
        consumer.close()


# --------------------------------------------------------------------------- report


def render(doc: dict[str, Any]) -> str:
    p = doc["in_process"]
    lines = [
        f"Flywheel identity bench {doc['started']}: {os.cpu_count()} CPUs, load average at start "
        f"{doc['loadavg_start']}; CPU time per event, best of {p['identity_stage']['passes']} passes",
        "",
        f"in process, {p['events']:,} validated sample events ({p['distinct_anonymous_ids']:,} anonymous ids, "
        f"{p['events_carrying_a_link']:,} carrying a link, {p['first_links']:,} first links):",
    ]
    for key, label in (("identity_stage", "identity stage (the stage's step, dict table, records serialised)"),
                       ("identity_model_apply", "identity model (IdentityMap.apply)"),
                       ("validate", "validate"),
                       ("validate_dedup_identity_dumps_metrics", "validate + dedup + identity + dumps + metrics"),
                       ("dedup_unbounded", "dedup table, one key per messageId for ever (before)"),
                       ("dedup_bounded", "dedup table, generations + sweep over 30 days, horizon 7")):
        r = p[key]
        lines.append(f"  {label:<64} {r['cpu_us_per_event']:>7.2f} us/event  {r['events_per_s_one_core']:>10,} ev/s")
    t = doc.get("table_bytes")
    if t:
        done = "all in ClickHouse" if t["complete"] else f"INCOMPLETE: {t['linked']:,} in ClickHouse"
        lines += ["", f"table bytes, a real worker linking {t['ids']:,} new anonymous ids ({done} after "
                      f"{t['worker_seconds']} s from its start; {t['links_per_s_after_ready']} links/s after "
                      f"'Worker ready', load average {t['loadavg_at_end']}):"]
        for table, what in (("identity", "per distinct id"), ("message-ids", "per messageId (dedup)")):
            r = t[table]
            c = r["changelog"]
            lines += [
                f"  {table} table, {what}:",
                f"    changelog key + value          {r['changelog_key_value_bytes_per_entry']:>7} B "
                f"({c['records']:,} records, {c['distinct_keys']:,} keys; headers add "
                f"{c['header_bytes'] / r['entries']:.1f} B)",
                f"    changelog segment files        {r['changelog_segment_bytes_per_entry']:>7} B (Kafka's log, "
                "uncompacted)",
                f"    RocksDB SST + WAL              {r['rocksdb_sst_wal_bytes_per_entry']:>7} B "
                f"(all files {r['rocksdb_all_files_bytes_per_entry']} B: fixed files per partition included)",
            ]
        s = t["identity"].get("sample_record")
        if s:
            lines.append(f"  an identity entry: key {s['key']!r} ({s['key_bytes']} B) -> value "
                         f"{s['value']!r} ({s['value_bytes']} B)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000, help="sample events for the in-process measurements")
    parser.add_argument("--repeat", type=int, default=3, help="passes per in-process measurement (best is kept)")
    parser.add_argument("--ids", type=int, default=10_000, help="anonymous ids linked by the worker (0: skip)")
    parser.add_argument("--budget", type=float, default=165,
                        help="seconds for the whole invocation (then the table is measured as it is)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    started = datetime.now(UTC)
    deadline = time.monotonic() + args.budget
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "config": vars(args) | {"partitions": PARTITIONS},
    }
    log(f"in-process measurements over {args.events:,} sample events")
    doc["in_process"] = in_process(args.events, args.repeat, args.seed)
    if args.ids:
        doc["table_bytes"] = table_bytes(args.ids, args.seed, deadline)
    doc["seconds_total"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    text = render(doc)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"identity-{stamp}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"identity-{stamp}.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nresults: {RESULTS}/identity-{stamp}.json and .txt ({doc['seconds_total']} s in all)")


if __name__ == "__main__":
    main()
