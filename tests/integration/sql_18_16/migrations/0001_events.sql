-- The events/invalid_events shape for Debian's clickhouse-server 18.16, used only by the native-protocol
-- transport test: same columns as sql/migrations, with the types 18.16 has (no DateTime64, no
-- LowCardinality, no column comments). The production schema targets current ClickHouse.
CREATE TABLE IF NOT EXISTS flywheel.events
(
    message_id String, type String, event String, anonymous_id String, user_id String, person_id String,
    previous_id String, group_id String, timestamp DateTime, received_at DateTime, sent_at Nullable(DateTime),
    properties String, traits String, context String, source String, late UInt8,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (toDate(timestamp), event, message_id);

CREATE TABLE IF NOT EXISTS flywheel.invalid_events
(
    received_at DateTime, source String, reasons Array(String), payload String, payload_encoding String,
    origin String, inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (toDate(received_at), source, origin);
