"""A minimal Python pipeline, the peer bench/pipeline.py compares Flywheel with (issue 19).

    .venv/bin/python bench/peer.py BOOTSTRAP TOPIC N DATA_DIR     # prints one JSON line when done

The kind of pipeline a team writes in an afternoon, as the throughput issue describes its peer (a Quix
Streams app): aiokafka (read_committed, a fresh group) → orjson → a pydantic envelope model → dedup by
messageId in a RocksDB state store (rocksdict, as Quix's and Faust's stores) → a batch insert of
JSONEachRow rows into its own embedded ClickHouse (chdb) → offsets committed after the insert. No
tracking plan, no DLQ, no identity, no metrics, no second Kafka hop: that is the work Flywheel adds.

It measures itself: events/s from its first record to the N-th row inserted, and its own CPU (every
thread: chdb's included) per event over the same window. (Flywheel's window opens at "Worker ready", after
its group join like the peer's; its first rows come ~2 s later, the pipeline's own latency, inside it.)
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
import uuid
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

BATCH = 5000


class Envelope(BaseModel):
    """The Segment envelope's fields a product-analytics table keeps."""

    model_config = ConfigDict(extra="allow")
    type: str
    messageId: str
    timestamp: datetime
    anonymousId: str | None = None
    userId: str | None = None
    event: str | None = None
    name: str | None = None
    properties: dict[str, Any] = {}
    context: dict[str, Any] = {}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(bootstrap: str, topic: str, n: int, data_dir: str) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer
    from chdb import session
    from rocksdict import Rdict, WriteBatch

    ch = session.Session(f"{data_dir}/clickhouse")
    ch.query("CREATE DATABASE IF NOT EXISTS peer")
    ch.query("CREATE TABLE IF NOT EXISTS peer.events (message_id String, type LowCardinality(String), "
             "event String, person String, timestamp DateTime64(3, 'UTC'), properties String, context String) "
             "ENGINE = MergeTree ORDER BY (timestamp, message_id)")
    seen = Rdict(f"{data_dir}/dedup")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"peer-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    rows = invalid = duplicates = 0
    first = cpu0 = None
    try:
        while rows + invalid + duplicates < n:
            batches = await consumer.getmany(timeout_ms=500, max_records=BATCH)
            if not batches:
                continue
            if first is None:
                first, cpu0 = time.monotonic(), cpu_seconds()
            lines, batch = [], WriteBatch()
            for records in batches.values():
                for record in records:
                    try:
                        e = Envelope.model_validate(orjson.loads(record.value))
                    except ValueError:
                        invalid += 1
                        continue
                    key = e.messageId.encode()
                    if seen.get(key) is not None:
                        duplicates += 1
                        continue
                    batch.put(key, b"1")
                    lines.append(orjson.dumps({
                        "message_id": e.messageId, "type": e.type, "event": e.event or e.name or "",
                        "person": e.userId or e.anonymousId or "", "timestamp": e.timestamp,
                        "properties": orjson.dumps(e.properties).decode(), "context": orjson.dumps(e.context).decode(),
                    }, option=orjson.OPT_UTC_Z))
            if lines:
                ch.query("INSERT INTO peer.events SETTINGS date_time_input_format = 'best_effort' FORMAT JSONEachRow\n"
                         + b"\n".join(lines).decode())
                rows += len(lines)
            seen.write(batch)
            await consumer.commit()
        done, cpu1 = time.monotonic(), cpu_seconds()
    finally:
        await consumer.stop()
        seen.close()
    stored = int(ch.query("SELECT count() FROM peer.events", "CSV").bytes())
    ch.close()
    return {"events_per_s": round(n / (done - first)), "seconds": round(done - first, 3),
            "cpu_seconds": round(cpu1 - cpu0, 2), "cpu_us_per_event": round((cpu1 - cpu0) / n * 1e6, 1),
            "cores": round((cpu1 - cpu0) / (done - first), 3), "rows": stored, "invalid": invalid,
            "duplicates": duplicates}


def main() -> None:
    bootstrap, topic, n, data_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    result = asyncio.run(run(bootstrap, topic, n, data_dir))
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
