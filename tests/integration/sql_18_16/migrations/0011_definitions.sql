-- 18.16's shape of sql/migrations/0011_definitions.sql (no DateTime64, no LowCardinality).
CREATE TABLE IF NOT EXISTS flywheel.definition_changes
(
    revision UInt64, kind String, name String, change Enum8('added' = 1, 'changed' = 2, 'deleted' = 3),
    version String, definition String, before String, author String, via String, comment String, at DateTime,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY revision;

CREATE TABLE IF NOT EXISTS flywheel.definition_backfills
(
    revision UInt64, predicates Array(String), events UInt64, started DateTime, finished DateTime,
    inserted_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree
ORDER BY (revision, started);
