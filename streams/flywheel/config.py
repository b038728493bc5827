"""Configuration: environment variables (FLYWHEEL_*) over a YAML config file over defaults.

The defaults run locally with nothing set: Kafka on 127.0.0.1:9092, embedded ClickHouse under
./.flywheel, the collector on :8088 with the development write key. The config file is
FLYWHEEL_CONFIG, else ./flywheel.yaml if present; it uses the same names without the prefix, in lower
case (`kafka_bootstrap: ...`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from flywheel import paths
from flywheel.model.clock import wall_ms
from flywheel.model.envelope import Limits

DEV_WRITE_KEY = "flywheel-dev-key"


class Topics(BaseSettings):
    """Kafka topic names (docs/design.md §1). Override one with e.g. FLYWHEEL_TOPIC_RAW."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_TOPIC_")

    raw: str = "events.raw"
    invalid: str = "events.invalid"
    identified: str = "events.identified"
    identity_changes: str = "identity.changes"
    funnels: str = "metrics.funnels"
    retention: str = "metrics.retention"
    active_users: str = "metrics.active_users"
    lifecycle: str = "metrics.lifecycle"
    experiments: str = "metrics.experiments"
    segments: str = "segments.changes"
    rfm: str = "segments.rfm"
    alert_series: str = "alerts.series"
    alerts: str = "alerts"
    definitions: str = "definitions"  # one partition, compacted: the stored definitions (docs/design.md §13)

    @classmethod
    def prefixed(cls, prefix: str, **names: str) -> Topics:
        """Every topic under `prefix` (one pipeline's own: tests, benches), but for the `names` given."""
        return cls(**{name: f"{prefix}{f.default}" for name, f in cls.model_fields.items()} | names)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    clickhouse_url: str | None = Field(
        None, description="clickhouse://user:pass@host:9000/flywheel for a server; flywheel:///<data dir> for a "
                          "`flywheel store` on this machine; unset = embedded (chdb) in this worker"
    )
    data_dir: Path = Field(Path(".flywheel"), description="embedded ClickHouse, local Kafka and state stores")
    http_port: int = Field(8088, description="public listener: the Segment collector /v1/* (and /health)")
    http_host: str = Field("0.0.0.0", description="address of the public listener")
    admin_port: int = Field(8089, description="admin listener: /health, /metrics, /sql (embedded ClickHouse)")
    admin_host: str = Field("127.0.0.1", description="address of the admin listener; keep it private")
    ui: bool = Field(True, description="serve the web UI under /ui on a worker's admin listener (its Kafka "
                     "consumer starts with the first open page)")
    ui_port: int = Field(8090, description="`flywheel ui`'s port (the UI on its own)")
    ui_host: str = Field("127.0.0.1", description="`flywheel ui`'s address")
    ui_secure_cookies: bool = Field(False, description="mark the UI's cookies Secure (HTTPS only) even when the "
                                    "request arrived over HTTP: set it behind a TLS-terminating proxy")
    write_keys: str = Field(DEV_WRITE_KEY, description="comma-separated write keys accepted by the collector")
    metrics: Path = Field(
        default_factory=lambda: paths.schemas_dir() / "metrics.yaml",
        description="funnel/retention definitions (YAML); the default is the e-commerce example in schemas/",
    )
    tracking_plan: Path = Field(
        default_factory=lambda: paths.schemas_dir() / "tracking_plan.yaml",
        description="tracking plan (YAML): event names, property types, unknown-event policy",
    )
    app_id: str = Field("flywheel", description="Faust application id = Kafka consumer group")
    partitions: int = Field(8, description="partitions for topics Flywheel creates")
    replication: int = Field(1, description="replication factor for topics Flywheel creates")
    store: str = Field("rocksdb://", description="Faust table store: rocksdb:// or memory://")
    store_memory_mb: int = Field(
        512, ge=24, description="RocksDB memory of a worker's state tables (memtables and block caches), split "
                                "evenly over every table partition it could hold (3 tables × FLYWHEEL_PARTITIONS; "
                                "the small alerts table takes ~3 MB per partition besides); the data itself lives "
                                "on disk"
    )
    session_timeout_seconds: float = Field(
        60.0, description="a worker silent this long loses its partitions to the others (after a crash: how soon "
                          "they move); heartbeats go every 3 s"
    )
    restore_bulk_min_records: int = Field(
        10_000, ge=1, description="once a table partition is this many changelog records behind, every partition "
                                  "behind is restored in bulk (write batches, ~180k records/s) before Faust's "
                                  "recovery (~4.4k records/s)"
    )
    dedup_horizon_days: int = Field(
        7, ge=1, description="an SDK retry (same messageId) arriving within this many days of the first copy is "
                             "dropped; the dedup table keeps between one and two horizons of messageIds"
    )
    segment_sweep_seconds: float = Field(
        10.0, gt=0, description="how often the persons whose segment membership is due to change are re-evaluated: "
                                "an exit by time comes at most this late (plus the sweep's own work)"
    )
    backfill_page_events: int = Field(
        5000, gt=0, description="events a backfill of new conditions reads from ClickHouse and sends per page "
                                "(docs/design.md §13)"
    )
    backfill_pause_seconds: float = Field(
        0.0, ge=0, description="pause between two backfill pages: spares ClickHouse and the stream on a large history"
    )
    alert_webhooks: str = Field(
        "", description="comma-separated URL prefixes alert webhooks may post to (scheme, host, port and a path "
                        "prefix, e.g. https://hooks.slack.com/services/); a rule naming another URL is refused"
    )
    alert_tick_seconds: float = Field(
        2.0, gt=0, description="how often each worker reports how far its stages have processed their input, "
                               "which closes alert periods: a period's verdict comes at most about this late"
    )
    clock_file: Path | None = Field(
        None, description="testing only: read the time now (epoch ms) from this file instead of the system clock "
                          "(segment windows are relative to now)"
    )
    sink_batch_size: int = Field(5000, description="max rows per ClickHouse insert")
    sink_flush_seconds: float = Field(1.0, description="max seconds a row waits before its insert")
    aggregate_linger_seconds: float = Field(
        0.2, ge=0, description="max seconds an identified event waits for others to be aggregated with: its cells "
                               "are published, and its row inserted, with that batch"
    )
    sink_max_backoff_seconds: float = Field(
        30.0, description="cap of the back-off between retries of a failed batch (ClickHouse or Kafka down)"
    )
    max_future_seconds: int = Field(86_400, description="event times further ahead of receivedAt are invalid")
    max_event_bytes: int = Field(32 * 1024, description="a single event above this size is invalid")
    collector_max_request_bytes: int = Field(
        500 * 1024, description="collector: a request body (after decompression) above this size gets 400"
    )
    collector_timeout_seconds: float = Field(
        10.0, description="collector: how long a request waits for Kafka to commit its events before 503"
    )
    collector_retry_after_seconds: int = Field(5, description="collector: Retry-After sent with a 503")
    collector_transaction_lanes: int = Field(
        2, description="collector: Kafka transactions in flight at once (one transactional producer each)"
    )
    ready_max_lag: int = Field(
        100_000, description="a worker further behind on events.raw is not ready (/health/ready answers 503)"
    )
    log_level: str = Field("info", description="debug, info, warning, error")
    log_format: str = Field("text", description="text, or json: one JSON object per line, for log shippers")
    profile: Path | None = Field(
        None, description="profile the worker with pyinstrument, saved to this file at shutdown (bench)"
    )
    topics: Topics = Field(default_factory=Topics)

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, v: str) -> str:
        if v not in ("text", "json"):
            raise ValueError(f"FLYWHEEL_LOG_FORMAT must be text or json, not {v!r}")
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _strip_scheme(cls, v: str) -> str:
        return v.removeprefix("kafka://")

    def clock(self) -> Callable[[], int]:
        """The time segment windows are relative to, epoch ms: the system clock, or (tests) `clock_file`'s."""
        path = self.clock_file
        if path is None:
            return wall_ms
        return lambda: int(path.read_text().strip())

    def as_env(self) -> dict[str, str]:
        """These settings as FLYWHEEL_* environment variables (for starting a child process)."""
        env = {f"FLYWHEEL_{k.upper()}": str(v) for k, v in self.model_dump(exclude={"topics"}).items() if v is not None}
        env.update({f"FLYWHEEL_TOPIC_{k.upper()}": v for k, v in self.topics.model_dump().items()})
        return env

    def limits(self) -> Limits:
        return Limits(max_event_bytes=self.max_event_bytes, max_request_bytes=self.collector_max_request_bytes,
                      max_future=timedelta(seconds=self.max_future_seconds))

    @property
    def write_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.write_keys.split(",") if k.strip())

    @property
    def clickhouse_dir(self) -> Path:
        return self.data_dir / "clickhouse"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFile(settings_cls))


class _YamlFile(PydanticBaseSettingsSource):
    """Values from FLYWHEEL_CONFIG (or ./flywheel.yaml): lowest priority above the defaults."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        explicit = os.environ.get("FLYWHEEL_CONFIG")
        path = Path(explicit) if explicit else Path("flywheel.yaml")
        self._values: dict[str, Any] = {}
        if explicit and not path.exists():
            raise FileNotFoundError(f"FLYWHEEL_CONFIG={explicit}: no such file")
        if path.exists():
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of setting: value")
            self._values = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if k in self.settings_cls.model_fields}


def load() -> Settings:
    return Settings()
