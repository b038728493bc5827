-- The identity tables' shape for Debian's clickhouse-server 18.16 (see 0001_events.sql): same columns as
-- sql/migrations/0002_identity.sql, DateTime for DateTime64; no view (18.16 lacks what events_resolved uses).
CREATE TABLE IF NOT EXISTS flywheel.identity_map
(
    distinct_id String, person_id String, version UInt64, message_id String, linked_at DateTime,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
ORDER BY distinct_id;

CREATE TABLE IF NOT EXISTS flywheel.identity_conflicts
(
    anonymous_id String, linked_to String, refused String, message_id String, at DateTime,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (anonymous_id, message_id);
