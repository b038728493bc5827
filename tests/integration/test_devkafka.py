"""flywheel.devkafka, the local broker `make run` and the tests start."""

from __future__ import annotations

import base64

import pytest
from flywheel import devkafka
from helpers import free_port

pytestmark = pytest.mark.integration


def test_a_cluster_id_starting_with_a_dash_formats_and_starts(tmp_path, monkeypatch):
    """A base64 cluster id starts with "-" one time in 64; passed as its own argument, the storage tool took
    it for an option and the broker never started (a CI run failed so)."""
    monkeypatch.setattr(devkafka, "_kafka_uuid", lambda seed: "-" + base64.urlsafe_b64encode(bytes(16)).decode()[1:22])
    broker = devkafka.Broker(data_dir=tmp_path / "kafka", port=free_port(), controller_port=free_port())
    devkafka.start(broker)
    try:
        assert (broker.data_dir / "logs" / "meta.properties").read_text().count("cluster.id=-") == 1
    finally:
        devkafka.stop(broker)
