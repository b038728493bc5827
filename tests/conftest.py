"""Session fixtures: one real Kafka broker for the whole run; helpers in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flywheel import devkafka
from helpers import ClickHouseServer, free_port, service_missing, unique_settings
from hypothesis import settings

# No timed assertions on a shared machine: Hypothesis' per-example deadline is one (gbstats' pydantic
# models, chdb queries and a busy neighbour all make examples slow at times).
settings.register_profile("flywheel", deadline=None)
settings.load_profile("flywheel")


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> str:
    """Bootstrap address of a real broker: FLYWHEEL_TEST_KAFKA if set, else a local one we start."""
    external = os.environ.get("FLYWHEEL_TEST_KAFKA")
    if external:
        try:
            devkafka.wait_ready(external, timeout=15)
        except devkafka.KafkaError as exc:
            service_missing("Kafka", str(exc))
        yield external
        return
    broker = devkafka.Broker(data_dir=tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port())
    try:
        devkafka.start(broker)
    except devkafka.KafkaError as exc:
        service_missing("Kafka", str(exc))
    yield broker.bootstrap
    devkafka.stop(broker)


@pytest.fixture
def pipeline_settings(kafka, tmp_path: Path):
    """Settings for an isolated pipeline on the session broker (own topics, group, data dir, port)."""
    return unique_settings(kafka, tmp_path / "flywheel")


@pytest.fixture
def clickhouse_server(tmp_path: Path):
    server = ClickHouseServer(tmp_path / "clickhouse-server")
    server.start()
    yield server
    server.stop()
