-- Accepted events, one row per messageId (README, "Querying").
-- ReplacingMergeTree collapses a row redelivered after a crash (same sorting key, same content);
-- SDK retries of a messageId are already dropped in the stream. Query with FINAL, or through the
-- views, for exact counts while a merge is pending.
CREATE TABLE IF NOT EXISTS flywheel.events
(
    message_id    String,
    type          LowCardinality(String),
    event         LowCardinality(String) COMMENT 'track: event name; page/screen: name; else empty',
    anonymous_id  String,
    user_id       String,
    person_id     String COMMENT 'person id known when the event was ingested; see events_resolved',
    previous_id   String COMMENT 'alias: the id being linked',
    group_id      String,
    timestamp     DateTime64(3, 'UTC') COMMENT 'event time, clock-skew corrected (docs/design.md §2)',
    received_at   DateTime64(3, 'UTC'),
    sent_at       Nullable(DateTime64(3, 'UTC')),
    properties    String COMMENT 'JSON object; read with JSONExtract*(properties, ...)',
    traits        String COMMENT 'JSON object',
    context       String COMMENT 'JSON object',
    source        LowCardinality(String) COMMENT 'write key / producer the event came through',
    late          UInt8 COMMENT '1 = older than the lateness bound for its person: not in aggregates',
    inserted_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (toDate(timestamp), event, message_id);

-- Events that failed validation, with the original bytes and every reason (the DLQ, queryable).
CREATE TABLE IF NOT EXISTS flywheel.invalid_events
(
    received_at       DateTime64(3, 'UTC'),
    source            LowCardinality(String),
    reasons           Array(String),
    payload           String COMMENT 'original bytes: UTF-8 text, or base64 when payload_encoding = base64',
    payload_encoding  LowCardinality(String),
    origin            String COMMENT 'topic/partition@offset of the raw record',
    inserted_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (toDate(received_at), source, origin);
