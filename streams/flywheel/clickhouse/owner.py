"""Who holds an embedded ClickHouse directory: the worker (or `flywheel store`) that names itself in
<data_dir>/worker.json — its pid, where its /sql answers, and the token /sql needs (mode 0600: only someone
who can read the data directory can query through it). Written first thing at start, before ClickHouse is
opened: from then on a command knows to ask that process rather than open the directory itself
(flywheel.query), and a store's workers know where to insert (clickhouse/store.py).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

import orjson

WORKER_FILE = "worker.json"


class AnotherWorker(RuntimeError):
    pass


def running_worker(data_dir: Path) -> dict | None:
    """What <data_dir>/worker.json says, if the process it names is alive."""
    try:
        info = orjson.loads((data_dir / WORKER_FILE).read_bytes())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        return None
    try:  # a worker killed -9 leaves the file behind, and its pid may go to another program since
        args = Path(f"/proc/{int(info['pid'])}/cmdline").read_bytes().split(b"\0")
        if not {b"worker", b"store"} & set(args) or not any(b"flywheel" in a for a in args):
            return None
    except OSError:
        pass  # no /proc here: trust the pid
    return info


_held: list[int] = []  # the lock file's descriptor, kept open for the life of the process


def advertise(data_dir: Path, *, host: str, port: int) -> str:
    """Take <data_dir>/worker.lock (flock: released by the kernel however the process ends), write
    <data_dir>/worker.json (this pid, where /sql will answer, a new token; mode 0600) and return the
    token. Refuses when another worker holds the directory."""
    fd = os.open(data_dir / "worker.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = running_worker(data_dir)
        who = f" (pid {other['pid']})" if other else ""
        raise AnotherWorker(f"another worker{who} runs on {data_dir}: one worker per data directory (set "
                            "FLYWHEEL_DATA_DIR to another directory for a second worker)") from None
    _held.append(fd)
    token = secrets.token_urlsafe(24)
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    info = {"pid": os.getpid(), "host": reach, "port": port, "token": token}
    # Written aside and renamed: a reader never sees half a file, and an old file's mode never survives.
    path, aside = data_dir / WORKER_FILE, data_dir / f".{WORKER_FILE}.{os.getpid()}"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(info))
    os.replace(aside, path)
    return token
