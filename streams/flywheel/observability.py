"""Logging set-up and the Prometheus metrics every stage reports (served at /metrics)."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("flywheel_events_received_total", "Raw records read from events.raw", ["source"])
VALID = Counter("flywheel_events_valid_total", "Records that passed validation", ["source"])
INVALID = Counter("flywheel_events_invalid_total", "Records sent to the DLQ", ["source"])
REPLAYED = Counter(
    "flywheel_events_replayed_total",
    "Raw records that are replays of rejected ones (flywheel dlq replay); counted in received too", ["source"],
)
DUPLICATES = Counter(
    "flywheel_events_duplicate_total", "Valid records dropped as SDK retries of a seen messageId", ["source"]
)
FORGET_REQUESTS = Counter(
    "flywheel_forget_requests_total", "Forget requests (flywheel persons forget) applied, by stage", ["stage"]
)
IDENTITY_LINKS = Counter("flywheel_identity_links_total", "First links of an anonymous id to a user")
IDENTITY_CONFLICTS = Counter(
    "flywheel_identity_conflicts_total", "Refused links: the anonymous id already belongs to another user", ["source"]
)
SINK_ROWS = Counter("flywheel_sink_rows_total", "Rows inserted into ClickHouse", ["table"])
SINK_BATCHES = Histogram(
    "flywheel_sink_insert_seconds", "Duration of one successful ClickHouse insert", ["table"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_FAILURES = Counter(
    "flywheel_sink_failures_total", "Failed ClickHouse inserts, by kind (retry | bad_data)", ["table", "kind"]
)
SINK_BLOCKED = Gauge(
    "flywheel_sink_blocked", "1 while a sink waits for ClickHouse (consumption of its topic is paused)", ["table"]
)
STAGE_FAILING = Gauge(
    "flywheel_stage_failing", "1 while a stage's batch keeps failing and is retried (its partitions wait)", ["stage"]
)
SINK_REJECTED = Counter(
    "flywheel_sink_rejected_rows_total", "Rows ClickHouse refused as bad data, dead-lettered", ["table"]
)

COLLECTOR_REQUESTS = Counter(
    "flywheel_collector_requests_total", "Collector HTTP requests, by path (/v1/<path>) and status",
    ["path", "status"],
)
COLLECTOR_EVENTS = Counter(
    "flywheel_collector_events_accepted_total", "Events committed to events.raw by the collector", ["source"]
)
COLLECTOR_REJECTS = Counter(
    "flywheel_collector_rejects_total",
    "Collector requests refused as a whole, by reason (unauthorized, request_too_large, event_too_large, "
    "malformed_json, invalid_batch, bad_encoding, kafka_unavailable)",
    ["reason"],
)
COLLECTOR_PRODUCE_SECONDS = Histogram(
    "flywheel_collector_produce_seconds",
    "From a request's events queued to their Kafka transaction committed (or failed)",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COLLECTOR_TRANSACTIONS = Counter(
    "flywheel_collector_transactions_total", "Collector Kafka transactions, by outcome (committed | aborted)",
    ["outcome"],
)
COLLECTOR_GROUP_EVENTS = Histogram(
    "flywheel_collector_transaction_events", "Events per committed collector transaction (group commit)",
    buckets=(1, 10, 100, 250, 500, 1000, 2500, 5000, 10000, 20000),
)


# Libraries whose INFO lines are chatter at our default level: a connection's life in twenty lines.
QUIET = ("kafka", "aiokafka")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Faust's and mode's INFO lines an operator reads: the worker's own state changes. The rest (every service
# starting and stopping, every store partition opened, tables of offsets) shows at debug.
FAUST_STATE_CHANGES = ("Worker ready", "Restoring state from changelog", "Recovery complete", "Signal received",
                       "[^Worker]: Stopping", "Closing event loop")


# Faust's stall detector (faust/transport/drivers/aiokafka.py): its ERROR lines carry this explanation.
STALL_EXPLAINED = "There are multiple possible explanations for this"
STALL_NOTE = " (Faust's stall detector; `flywheel status` shows which stages are failing, and why)"


class Readable(logging.Filter):
    """Below WARNING, Faust and mode (and mode's services of ours) say only the worker's state changes, each
    on one line (some come with an ASCII table under them). Faust's stall detector says its finding in
    one line, as a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("faust.") and record.levelno == logging.ERROR:
            message = record.getMessage()
            if STALL_EXPLAINED in message:  # Faust's stall detector: twenty lines, "report as bug"
                # A batch held by the retry policy (ClickHouse down) or a partition without traffic looks
                # stalled to it; our retry lines and `flywheel status` say which. One line, a warning.
                record.msg, record.args = message.split(STALL_EXPLAINED, 1)[0].strip() + STALL_NOTE, ()
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if record.levelno >= logging.WARNING or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        message = record.getMessage()
        # mode's services (ours too) prefix their lines with their place in the tree: "[^--Consumer]: …"
        if record.name.split(".")[0] not in ("faust", "mode") and not message.startswith("[^"):
            return True
        if not any(change in message for change in FAUST_STATE_CHANGES):
            return False
        if "\n" in message:
            record.msg, record.args = message.split("\n", 1)[0].rstrip(" :"), ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (FLYWHEEL_LOG_FORMAT=json), for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def logging_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """The logging set-up of every process (a dict for logging.config.dictConfig; Faust's worker takes it
    as is): one format, on stderr, no terminal codes, libraries' chatter only from WARNING (or at debug)."""
    root = level.upper()
    library = root if root == "DEBUG" else "WARNING"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"readable": {"()": Readable}},
        "formatters": {"text": {"format": TEXT_FORMAT}, "json": {"()": JsonFormatter}},
        "handlers": {"default": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                 "formatter": fmt, "filters": ["readable"]}},
        "root": {"level": root, "handlers": ["default"]},
        "loggers": {name: {"level": library} for name in QUIET},
    }


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    logging.config.dictConfig(logging_config(level, fmt))


LATE_EVENTS = Counter(
    "flywheel_events_late_total", "Events older than their lateness bound: stored with late=1, not in aggregates",
    ["rule"],
)
PERSON_HANDOFFS = Counter("flywheel_person_handoffs_total", "Anonymous person states handed to their user")
BACKFILL_EVENTS = Counter("flywheel_backfill_events_total",
                          "Stored events sent back to their persons for conditions new to the definitions (the leader)")
BACKFILL_APPLIED = Counter("flywheel_backfill_applied_total",
                           "Backfilled events applied to a person state (docs/design.md §13)")
PARTIALS_PUBLISHED = Counter(
    "flywheel_partials_published_total", "Metric cells published (absolute per-partition values)", ["metric"]
)
AUDIENCE_CHANGES = Counter(
    "flywheel_audience_changes_total", "Segment membership changes published to segments.changes", ["event"]
)
SEGMENT_SWEPT = Counter(
    "flywheel_segment_sweep_persons_total", "Persons re-evaluated by the segment sweep because their due time came"
)
ALERT_TRANSITIONS = Counter(
    "flywheel_alert_transitions_total", "Alert rules that started firing or resolved (docs/design.md §10)", ["state"]
)
ALERT_DELIVERIES = Counter("flywheel_alert_webhook_deliveries_total", "Alert transitions posted to a webhook")
PARTIALS_RESTORED = Counter(
    "flywheel_partials_restored_total",
    "Partitions whose partials were restored at assignment, by how (checkpoint | count: from the person states)",
    ["how"],
)
CLOSED_CELL_UPDATES = Counter(
    "flywheel_closed_cell_updates_total", "Events whose effect on already-closed metric cells was not published"
)
EXPERIMENT_HISTORY_CUT = Counter(
    "flywheel_experiment_history_cut_total",
    "Hand-offs joining an exposure older than the other state's kept history (experiment values there may be missing)"
)
