"""observability.py: one log format for every process, no terminal codes, libraries' chatter only from
WARNING, Faust's lines only for the worker's state changes (each on one line), JSON lines on request."""

from __future__ import annotations

import io
import logging
import logging.config

import orjson
import pytest
from flywheel.observability import logging_config


@pytest.fixture
def captured():
    stream = io.StringIO()

    def configure(level: str = "info", fmt: str = "text") -> io.StringIO:
        config = logging_config(level, fmt)
        config["handlers"]["default"]["stream"] = stream
        logging.config.dictConfig(config)
        return stream

    yield configure
    logging.config.dictConfig(logging_config())


def test_text_lines_without_terminal_codes_and_only_state_changes_of_faust(captured):
    out = captured()
    logging.getLogger("flywheel.stages.aggregate").info("partials of partitions %s restored", [0, 1])
    logging.getLogger("faust.tables.recovery").info("Highwater for active changelog partitions:\n+----+\n| t |")
    logging.getLogger("faust.tables.recovery").info("[^---Recovery]: Restoring state from changelog topics...\n+-+")
    logging.getLogger("faust.stores.rocksdb").info("opening partition 3 for gen id 1 app id 1")
    logging.getLogger("mode.services").info("[^--Producer]: Starting...")
    logging.getLogger("flywheel.runtime.app").info("[^-Listeners]: Starting...")  # a service of ours
    logging.getLogger("faust.tables.recovery").info("[^---Recovery]: Worker ready")
    logging.getLogger("aiokafka.consumer.group_coordinator").info("Discovered coordinator 1 for group g")
    logging.getLogger("kafka.conn").info("<BrokerConnection node_id=1> connecting")
    logging.getLogger("kafka.conn").warning("connection lost")
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 3)[2:] for line in lines] == [
        ["INFO", "flywheel.stages.aggregate: partials of partitions [0, 1] restored"],
        ["INFO", "faust.tables.recovery: [^---Recovery]: Restoring state from changelog topics..."],
        ["INFO", "faust.tables.recovery: [^---Recovery]: Worker ready"],
        ["WARNING", "kafka.conn: connection lost"],
    ]
    assert "\x1b" not in out.getvalue()


def test_debug_lets_the_libraries_speak(captured):
    out = captured("debug")
    logging.getLogger("aiokafka.conn").debug("sent a request")
    logging.getLogger("mode.services").info("[^--Producer]: Starting...")
    assert "aiokafka.conn: sent a request" in out.getvalue() and "Producer]: Starting" in out.getvalue()


def test_json_lines(captured):
    out = captured(fmt="json")
    log = logging.getLogger("flywheel.worker")
    log.info("ClickHouse: %s", "embedded")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("a batch failed")
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "flywheel.worker", "ClickHouse: embedded")
    assert "time" in first and second["message"] == "a batch failed" and "ValueError: boom" in second["error"]


def test_fausts_stall_detector_says_its_finding_in_one_warning_line(captured):
    """Faust's own text, as its consumer thread builds it: if Faust changes it, this fails, not the logs."""
    from faust.transport.drivers import aiokafka as driver
    from faust.types import TP

    out = captured()
    message = driver.AIOKafkaConsumerThread._make_slow_processing_error(
        None, driver.SLOW_PROCESSING_NO_RECENT_COMMIT, [driver.SLOW_PROCESSING_CAUSE_COMMIT],
        "broker_commit_livelock_soft_timeout", 300.0)
    logging.getLogger(driver.__name__).error(message, TP("identity.changes", 6), "5.89 minutes ago")
    [line] = out.getvalue().splitlines()
    assert line.split(" ", 3)[2:] == ["WARNING", "faust.transport.drivers.aiokafka: Has not committed "
                                      "TP(topic='identity.changes', partition=6) (last commit 5.89 minutes ago). "
                                      "(Faust's stall detector; `flywheel status` shows which stages are failing, "
                                      "and why)"]
