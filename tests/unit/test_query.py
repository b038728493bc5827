"""flywheel.query and the worker's side of it: a query waits for a starting worker (named in worker.json
before its /sql is up) and for a directory held a moment by another process; a read cut by a dying
worker is asked again, a write never is; one worker per data directory. Real HTTP on 127.0.0.1; time
is the calls' own (no sleeps asserted)."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
from flywheel import query, worker
from flywheel.clickhouse import ClickHouseBusy
from flywheel.clickhouse.owner import WORKER_FILE, AnotherWorker, advertise, running_worker
from flywheel.config import Settings
from helpers import free_port


@pytest.fixture
def flywheel_process():
    """A live process whose command line says flywheel … worker, as a worker's does."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; print(flush=True); time.sleep(600)",
                             "flywheel", "worker"], stdout=subprocess.PIPE)
    proc.stdout.readline()  # exec'd: /proc/<pid>/cmdline is its own, not still pytest's
    yield proc
    proc.kill()
    proc.wait()


def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def name_worker(s: Settings, pid: int, port: int, token: str = "t") -> None:
    s.data_dir.mkdir(parents=True, exist_ok=True)
    (s.data_dir / WORKER_FILE).write_bytes(orjson.dumps({"pid": pid, "host": "127.0.0.1", "port": port,
                                                          "token": token}))


class SqlServer:
    """A stand-in for the worker's /sql: answers, or cuts the connection the first `cut` times."""

    def __init__(self, port: int, *, cut: int = 0):
        self.requests: list[bytes] = []
        self.cut = cut
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests.append(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.cut > 0:
                    outer.cut -= 1
                    self.connection.shutdown(socket.SHUT_RDWR)  # the worker died mid-answer
                    return
                body = orjson.dumps({"columns": ["n"], "rows": [[42]]})
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                """Quiet: http.server would print every request to stderr."""

        self.server = http.server.HTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SqlServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_query_waits_for_a_starting_worker_and_says_so(tmp_path, flywheel_process):
    s, port = settings(tmp_path), free_port()
    name_worker(s, flywheel_process.pid, port)
    said: list[str] = []
    servers: list[SqlServer] = []

    def on_wait(why: str) -> None:
        said.append(why)
        if len(said) == 3:  # the worker's listener comes up after a few tries
            servers.append(SqlServer(port).__enter__())

    try:
        assert query.run(s, "SELECT 42", on_wait=on_wait) == (["n"], [[42]])
    finally:
        for server in servers:
            server.__exit__()
    assert len(said) == 3
    assert all(f"the worker (pid {flywheel_process.pid}) is starting" in why for why in said)


def test_a_read_cut_by_a_dying_worker_is_asked_again_a_write_is_not(tmp_path, flywheel_process):
    s, port = settings(tmp_path), free_port()
    name_worker(s, flywheel_process.pid, port)
    said: list[str] = []
    with SqlServer(port, cut=1) as server:
        assert query.run(s, "  select count() FROM flywheel.events", on_wait=said.append) == (["n"], [[42]])
        assert len(server.requests) == 2 and "went away while answering" in said[0]

        server.cut = 1
        with pytest.raises(query.QueryError, match="may or may not have run"):
            query.run(s, "ALTER TABLE flywheel.events DELETE WHERE 1", on_wait=said.append)
        assert len(server.requests) == 3


def test_waiting_gives_up_with_the_reason(tmp_path, flywheel_process):
    s = settings(tmp_path)
    name_worker(s, flywheel_process.pid, free_port())
    with pytest.raises(query.QueryError, match=r"is starting.*gave up after 0 s"):
        query.run(s, "SELECT 1", wait=0)


def test_a_store_not_there_or_still_starting_is_waited_for(tmp_path, flywheel_process):
    """FLYWHEEL_CLICKHOUSE_URL=flywheel:///<a store's data dir>: as for a starting worker, saying why."""
    store = settings(tmp_path / "store")
    s = Settings(data_dir=tmp_path / "data", clickhouse_url=f"flywheel://{store.data_dir}")
    waits: list[str] = []
    with pytest.raises(query.QueryError, match="no `flywheel store` runs on .*; gave up after 0 s"):
        query.run(s, "SELECT 1", wait=0.3, on_wait=waits.append)
    assert waits and "no `flywheel store` runs on" in waits[0]
    name_worker(store, flywheel_process.pid, free_port())  # named, not listening yet
    with pytest.raises(query.QueryError, match=r"is starting.*gave up after 0 s"):
        query.run(s, "SELECT 1", wait=0)


def test_a_directory_held_a_moment_is_waited_for(tmp_path, monkeypatch):
    s = settings(tmp_path)
    calls: list[str] = []

    def direct(settings_, sql):
        calls.append(sql)
        if len(calls) < 3:
            raise ClickHouseBusy(f"{settings_.clickhouse_dir} is held by another process")
        return ["n"], [[7]]

    monkeypatch.setattr(query, "_direct", direct)
    said: list[str] = []
    assert query.run(s, "SELECT 7", on_wait=said.append) == (["n"], [[7]])
    assert len(calls) == 3 and len(said) == 2 and "held by another process" in said[0]


def test_a_dead_or_foreign_pid_in_worker_json_is_no_worker(tmp_path):
    s = settings(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass", "flywheel", "worker"])
    dead.wait()
    name_worker(s, dead.pid, 1)
    assert running_worker(s.data_dir) is None
    other = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE)  # alive, not flywheel
    other.stdout.readline()
    try:
        name_worker(s, other.pid, 1)
        assert running_worker(s.data_dir) is None
    finally:
        other.kill()
        other.wait()


def test_one_worker_per_data_directory(tmp_path):
    s = settings(tmp_path)
    s.data_dir.mkdir(parents=True)
    holder = subprocess.Popen(  # a worker: holds worker.lock as long as it lives
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(600)", str(s.data_dir / "worker.lock"),
         "flywheel", "worker"], stdout=subprocess.PIPE)
    holder.stdout.readline()
    name_worker(s, holder.pid, 1)
    with pytest.raises(AnotherWorker, match=f"another worker \\(pid {holder.pid}\\)"):
        advertise(s.data_dir, host="0.0.0.0", port=8089)
    holder.kill()  # as a kill -9: the kernel lets the lock go
    holder.wait()
    token = advertise(s.data_dir, host="0.0.0.0", port=8089)  # the stale file is replaced
    info = orjson.loads((s.data_dir / WORKER_FILE).read_bytes())
    assert info == {"pid": os.getpid(), "host": "127.0.0.1", "port": 8089, "token": token}
    assert (s.data_dir / WORKER_FILE).stat().st_mode & 0o777 == 0o600


def test_a_starting_worker_waits_for_a_held_directory_and_gives_up_saying_what_to_do(tmp_path, monkeypatch):
    s = settings(tmp_path)
    now = [0.0]
    attempts: list[int] = []

    def connect(*, url, data_dir):
        attempts.append(1)
        if len(attempts) < 4:
            raise ClickHouseBusy(f"{data_dir} is held by another process")
        return "engine"

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(worker.clickhouse, "connect", connect)
    assert worker.open_clickhouse(s, wait=60, clock=lambda: now[0], sleep=sleep) == "engine"
    assert len(attempts) == 4

    attempts.clear()
    now[0] = 0.0
    monkeypatch.setattr(worker.clickhouse, "connect",
                        lambda **kw: (_ for _ in ()).throw(ClickHouseBusy("held by another process")))
    with pytest.raises(ClickHouseBusy, match=r"waited 60 s; stop the process holding it \(fuser -v"):
        worker.open_clickhouse(s, wait=60, clock=lambda: now[0], sleep=sleep)
