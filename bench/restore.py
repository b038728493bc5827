"""How fast a table's changelog can be restored outside Faust: the measurement behind the plan for a
worker without local state (README "Known limitations": Faust's recovery restores ~4,400 records/s here).

    .venv/bin/python bench/restore.py                      # 1,000,000 records of 200 B, 8 partitions
    .venv/bin/python bench/restore.py --records 300000

One invocation: a local Kafka (flywheel.devkafka, free ports, temporary directory), a topic filled with
--records keyed records, then the bulk loop a restore seam would run — aiokafka `getmany` in large
fetches, one rocksdict WriteBatch per partition per fetch, into a RocksDB per partition — timed (wall and
CPU). Nothing of Flywheel's pipeline runs: it bounds what a restore could cost, not what one does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from flywheel import devkafka

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as pl  # noqa: E402  (bench/pipeline.py: free ports, the batch sender)


async def fill(bootstrap: str, topic: str, records: int, partitions: int, size: int) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, max_batch_size=512 * 1024,
                                max_request_size=8 * 2**20)
    await producer.start()
    try:
        batches = pl.Batches(producer, topic, partitions)
        value = os.urandom(size)
        for i in range(records):
            await batches.add(i % partitions, f"person-{i:08d}".encode(), value)
        await batches.flush()
    finally:
        await producer.stop()


async def restore(bootstrap: str, topic: str, partitions: int, directory: Path) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from rocksdict import Options, Rdict, WriteBatch

    dbs = {p: Rdict(str(directory / f"p{p}"), Options(raw_mode=True)) for p in range(partitions)}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=16 * 2**20, fetch_max_bytes=64 * 2**20)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        started, cpu, n, done = time.monotonic(), time.process_time(), 0, set()
        while len(done) < partitions:
            for tp, records in (await consumer.getmany(timeout_ms=500, max_records=50_000)).items():
                batch = WriteBatch(raw_mode=True)
                for r in records:
                    if r.value is None:
                        batch.delete(r.key)
                    else:
                        batch.put(r.key, r.value)
                dbs[tp.partition].write(batch)
                n += len(records)
                if records[-1].offset + 1 >= end[tp]:
                    done.add(tp)
        return {"records": n, "seconds": time.monotonic() - started, "cpu_seconds": time.process_time() - cpu}
    finally:
        await consumer.stop()
        for db in dbs.values():
            db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--value-bytes", type=int, default=200, help="a person state is ~220 B")
    args = parser.parse_args()
    from kafka.admin import KafkaAdminClient, NewTopic

    tmp = Path(tempfile.mkdtemp(prefix="flywheel-restore-"))
    broker = devkafka.Broker(data_dir=tmp / "kafka", port=pl.free_port(), controller_port=pl.free_port())
    devkafka.start(broker)
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic("changelog", args.partitions, 1)])
        admin.close()
        asyncio.run(fill(broker.bootstrap, "changelog", args.records, args.partitions, args.value_bytes))
        r = asyncio.run(restore(broker.bootstrap, "changelog", args.partitions, tmp))
        print(f"restored {r['records']:,} records in {r['seconds']:.1f} s ({r['records'] / r['seconds']:,.0f}/s), "
              f"{r['cpu_seconds']:.1f} CPU s; Faust's recovery does ~4,400 records/s on this machine")
    finally:
        devkafka.stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
