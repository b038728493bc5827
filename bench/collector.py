"""Bench: accepted events/s for ONE collector process (`flywheel collector`), batches of 100 events.

    .venv/bin/python bench/collector.py                     # 200 000 events, 16 concurrent clients
    .venv/bin/python bench/collector.py --profile           # same, collector under pyinstrument
    .venv/bin/python bench/collector.py --events 50000 --concurrency 32 --gzip

Everything runs on this machine, over loopback: a Kafka broker (FLYWHEEL_KAFKA_BOOTSTRAP if it
answers, else a throw-away one on free ports), the collector as a child process, and the load
generator (this process: asyncio + aiohttp, pre-built request bodies, so it costs little). The run is
bounded by --events and --seconds. "Accepted" means answered 200, i.e. committed in Kafka (acks=all,
transactions): the collector's own counters are printed next to the client's view to cross-check.
Note the machine is shared by the three: the numbers are for all of them on its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip as gzip_mod
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "streams"))

from flywheel import devkafka  # noqa: E402
from flywheel.config import Settings, Topics  # noqa: E402
from flywheel.runtime.topics import ensure_topics  # noqa: E402

KEY = "bench-write-key"
EVENT_NAMES = ["Product Viewed", "Product Added", "Checkout Started", "Order Completed", "Products Searched"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bodies(n_bodies: int, batch: int, *, gzip: bool) -> list[bytes]:
    """Request bodies shaped like analytics-python's: ~350-byte events, batch-level sentAt."""
    out = []
    for b in range(n_bodies):
        items = []
        for i in range(batch):
            anon = f"anon-{(b * batch + i) % 5000}"
            items.append({
                "type": "track", "event": EVENT_NAMES[i % len(EVENT_NAMES)], "anonymousId": anon,
                "messageId": str(uuid.uuid4()), "timestamp": "2026-11-21T12:00:00.000+00:00",
                "properties": {"product_id": f"p-{i}", "category": "shoes", "price": 19.99 + i},
                "context": {"library": {"name": "analytics-python", "version": "2.4.0"}},
                "integrations": {},
            })
        raw = orjson.dumps({"batch": items, "sentAt": "2026-11-21T12:00:01.000+00:00"})
        out.append(gzip_mod.compress(raw) if gzip else raw)
    return out


async def load(url: str, payloads: list[bytes], *, events: int, batch: int, seconds: float,
               concurrency: int, gzip: bool) -> dict:
    import aiohttp

    headers = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode(),
               "Content-Type": "application/json"}
    if gzip:
        headers["Content-Encoding"] = "gzip"
    n_requests = events // batch
    issued = 0
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < n_requests and time.monotonic() < deadline:
            body = payloads[issued % len(payloads)]
            issued += 1
            t = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append(time.perf_counter() - t)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # warm-up: producer start, metadata, first transaction
        for _ in range(3):
            async with session.post(url, data=payloads[0], headers=headers) as r:
                await r.read()
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    latencies.sort()
    return {
        "elapsed": elapsed, "requests": sum(statuses.values()), "statuses": statuses,
        "accepted_events": ok * batch, "events_per_s": ok * batch / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0.0,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_lines(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("flywheel_collector_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="events to send (upper bound)")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop sending after this long")
    parser.add_argument("--warmup", type=int, default=30_000,
                        help="events sent first and not counted (JIT of a fresh broker, connections)")
    parser.add_argument("--batch", type=int, default=100, help="events per /v1/batch request")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--gzip", action="store_true", help="gzip request bodies")
    parser.add_argument("--lanes", type=int, default=None,
                        help="Kafka transactions in flight (FLYWHEEL_COLLECTOR_TRANSACTION_LANES)")
    parser.add_argument("--profile", action="store_true", help="run the collector under pyinstrument")
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-collector-"))
    broker = None
    bootstrap = os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP", "")
    try:
        if bootstrap:
            devkafka.wait_ready(bootstrap, timeout=10)
        else:
            broker = devkafka.Broker(data_dir=work / "kafka", port=free_port(), controller_port=free_port())
            devkafka.start(broker)
            bootstrap = broker.bootstrap
    except devkafka.KafkaError as exc:
        sys.exit(f"no Kafka: {exc}")

    tag = f"bench{os.getpid()}"
    topics = Topics(raw=f"{tag}.events.raw", invalid=f"{tag}.events.invalid",
                    identified=f"{tag}.events.identified", identity_changes=f"{tag}.identity.changes")
    settings = Settings(kafka_bootstrap=bootstrap, topics=topics, partitions=args.partitions, write_keys=KEY,
                        data_dir=work / "flywheel")
    ensure_topics(settings)
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")} | {
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap, "FLYWHEEL_WRITE_KEYS": KEY, "FLYWHEEL_TOPIC_RAW": topics.raw,
        "FLYWHEEL_ADMIN_PORT": str(admin_port),
        "FLYWHEEL_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO / "streams"),
    }
    if args.lanes:
        env["FLYWHEEL_COLLECTOR_TRANSACTION_LANES"] = str(args.lanes)
    profile_out = work / "collector-profile.txt"
    command = [sys.executable]
    if args.profile:
        command += ["-m", "pyinstrument", "-r", "text", "--no-color", "-o", str(profile_out), "-m"]
    else:
        command += ["-m"]
    command += ["flywheel.cli", "collector", "--host", "127.0.0.1", "--port", str(port)]
    log = open(work / "collector.log", "wb")
    collector = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                if collector.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"collector did not start: {(work / 'collector.log').read_text()[-2000:]}")
                time.sleep(0.2)

        payloads = bodies(200, args.batch, gzip=args.gzip)
        print(f"collector pid {collector.pid} on :{port} → {topics.raw} ({args.partitions} partitions) at "
              f"{bootstrap}; {args.concurrency} clients, batches of {args.batch}, "
              f"{'gzip ' if args.gzip else ''}{len(payloads[0]) // 1024} KB per request"
              f"{', PROFILED' if args.profile else ''}; {os.cpu_count()} CPUs shared with Kafka and the load")
        url = f"http://127.0.0.1:{port}/v1/batch"
        if args.warmup:
            asyncio.run(load(url, payloads, events=args.warmup, batch=args.batch, seconds=args.seconds,
                             concurrency=args.concurrency, gzip=args.gzip))
        metrics_before = metric_lines(admin_port)
        broker_pid = devkafka.running_pid(broker) if broker is not None else None
        cpu_before = cpu_seconds(collector.pid)
        broker_before = cpu_seconds(broker_pid) if broker_pid else 0.0
        load_before = time.process_time()
        result = asyncio.run(load(url, payloads, events=args.events,
                                  batch=args.batch, seconds=args.seconds, concurrency=args.concurrency,
                                  gzip=args.gzip))
        collector_cpu = cpu_seconds(collector.pid) - cpu_before
        load_cpu = time.process_time() - load_before
        broker_cpu = cpu_seconds(broker_pid) - broker_before if broker_pid else None
        metrics = {k: v - metrics_before.get(k, 0.0) for k, v in metric_lines(admin_port).items()}
    finally:
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(timeout=60)
        except subprocess.TimeoutExpired:
            collector.kill()
        log.close()
        if broker is not None:
            devkafka.stop(broker)
        profile = profile_out.read_text() if profile_out.exists() else "(no profile written)"
        shutil.rmtree(work, ignore_errors=True)  # broker files and logs of this run

    committed = metrics.get('flywheel_collector_transactions_total{outcome="committed"}', 0)
    aborted = metrics.get('flywheel_collector_transactions_total{outcome="aborted"}', 0)
    in_kafka = metrics.get(f'flywheel_collector_events_accepted_total{{source="{_label()}"}}', 0)
    per_txn = metrics.get("flywheel_collector_transaction_events_sum", 0) / committed if committed else 0
    print(f"accepted: {result['accepted_events']} events in {result['elapsed']:.1f}s "
          f"= {result['events_per_s']:,.0f} events/s   (statuses {result['statuses']})")
    print(f"request latency: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
    print(f"collector process CPU: {collector_cpu:.1f} s over {result['elapsed']:.1f} s "
          f"({100 * collector_cpu / result['elapsed']:.0f}% of one core) = "
          f"{result['accepted_events'] / collector_cpu if collector_cpu else 0:,.0f} events per CPU-second")
    print(f"others on the same cores: load generator {load_cpu:.1f} s CPU, Kafka broker "
          + (f"{broker_cpu:.1f} s CPU" if broker_cpu is not None else "(external, not measured)")
          + f"; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"collector: {in_kafka:,.0f} events committed in {committed:,.0f} transactions "
          f"(avg {per_txn:,.0f} events per transaction), {aborted:.0f} aborted")
    if args.profile:
        print("\nwhere the collector's time goes (pyinstrument; it inflates pure-Python frames):\n")
        print(profile)


def _label() -> str:
    from flywheel.collector.auth import source_label

    return source_label(KEY)


if __name__ == "__main__":
    main()
