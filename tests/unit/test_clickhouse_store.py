"""clickhouse/store.py against a real store listener (web/admin.py's /store/insert and /sql over an embedded
ClickHouse): what a store's workers insert lands, queries answer as the embedded backend does, refused rows
come back as ClickHouse's bad-data error (the sink bisects and dead-letters those), anything else as
unavailable (the batch is retried), and a store that is not running is waited for."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import orjson
import pytest
from flywheel.clickhouse import connect, is_bad_data
from flywheel.clickhouse import store as store_module
from flywheel.clickhouse.errors import ClickHouseBusy, ClickHouseUnavailable
from flywheel.clickhouse.owner import WORKER_FILE, advertise
from flywheel.clickhouse.store import StoreClickHouse, StoreError, store_dir
from flywheel.web.admin import add_insert, add_sql, admin_app
from flywheel.web.server import Listener
from helpers import free_port


@pytest.fixture(autouse=True)
def this_process_may_be_the_store(monkeypatch):
    """running_worker trusts a pid only if its command line is a flywheel worker or store (not pytest's)."""
    def advertised(data_dir):
        path = data_dir / WORKER_FILE
        return orjson.loads(path.read_bytes()) if path.exists() else None
    monkeypatch.setattr(store_module, "running_worker", advertised)


@pytest.fixture(scope="module")
def store(ch, tmp_path_factory):
    """A store's listener in a thread of this process, advertised in a data directory of its own."""
    data_dir = tmp_path_factory.mktemp("store")
    port = free_port()
    token = advertise(data_dir, host="127.0.0.1", port=port)
    executor = ThreadPoolExecutor(max_workers=1)
    app = admin_app(role="store", checks=[], max_body=64 * 2**20)
    add_sql(app, ch=ch, executor=executor, token=token, port=port)
    add_insert(app, ch=ch, executor=executor, token=token)
    loop = asyncio.new_event_loop()
    listener = Listener(app, host="127.0.0.1", port=port, name="store")
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(listener.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    ch.command("CREATE TABLE IF NOT EXISTS flywheel.store_test (id UInt32, at DateTime64(3, 'UTC'), name String) "
               "ENGINE = MergeTree ORDER BY id")
    yield data_dir
    asyncio.run_coroutine_threadsafe(listener.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def test_rows_inserted_through_the_store_are_read_back_through_it(store):
    client = connect(url=f"flywheel://{store}", data_dir=None)
    assert isinstance(client, StoreClickHouse)
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    client.insert("flywheel.store_test", [{"id": i, "at": at, "name": f"n{i}"} for i in range(3)])
    columns, rows = client.rows("SELECT id, toString(at), name FROM flywheel.store_test ORDER BY id")
    assert columns == ["id", "toString(at)", "name"]
    assert rows == [(i, "2026-11-30 12:00:00.000", f"n{i}") for i in range(3)]


def test_rows_clickhouse_refuses_are_bad_data_and_a_wrong_query_is_its_error(store):
    client = StoreClickHouse(f"flywheel://{store}")
    with pytest.raises(StoreError) as refused:
        client.insert("flywheel.store_test", [{"id": "not a number", "at": "2026-11-30", "name": "x"}])
    assert is_bad_data(refused.value)  # the sink bisects and dead-letters such rows
    with pytest.raises(StoreError, match="UNKNOWN_TABLE|doesn't exist|does not exist"):
        client.rows("SELECT * FROM flywheel.no_such_table")


def test_a_wrong_token_or_a_store_gone_is_unavailable_not_bad_data(store, tmp_path):
    info = orjson.loads((store / WORKER_FILE).read_bytes())

    def advertised(name: str, **change) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / WORKER_FILE).write_bytes(orjson.dumps(info | change))
        return f"flywheel://{path}"

    with pytest.raises(ClickHouseUnavailable, match="401") as wrong:
        StoreClickHouse(advertised("forged", token="not-the-token")).rows("SELECT 1")
    assert not is_bad_data(wrong.value)
    with pytest.raises(ClickHouseBusy, match="is starting"):  # named, not listening yet: waited for
        StoreClickHouse(advertised("starting", port=free_port()))
    client = StoreClickHouse(advertised("gone"))
    (tmp_path / "gone" / WORKER_FILE).write_bytes(orjson.dumps(info | {"port": free_port()}))
    with pytest.raises(ClickHouseUnavailable, match="Connection refused") as gone:  # went away: retried
        client.insert("flywheel.store_test", [{"id": 9, "at": 0, "name": ""}])
    assert not isinstance(gone.value, ClickHouseBusy) and not is_bad_data(gone.value)


def test_no_store_yet_is_waited_for_and_the_url_names_a_directory(tmp_path):
    with pytest.raises(ClickHouseBusy, match="no `flywheel store` runs on"):
        StoreClickHouse(f"flywheel://{tmp_path}")
    assert store_dir("flywheel:///var/lib/flywheel/store").as_posix() == "/var/lib/flywheel/store"
    for bad in ("flywheel://host/dir", "flywheel:relative", "http:///x"):
        with pytest.raises(ValueError, match="flywheel:///"):
            store_dir(bad)


def test_the_store_advertises_this_process(store):
    assert str(os.getpid()).encode() in (store / WORKER_FILE).read_bytes()
