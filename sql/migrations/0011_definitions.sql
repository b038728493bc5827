-- Stored definitions (docs/design.md §13). The definitions topic holds the set in force (compacted: the latest
-- per definition); this table keeps every change — who, when, through what, the definition before and after —
-- for good. `revision` is the change's offset on the topic: one partition, so it orders every change.
CREATE TABLE IF NOT EXISTS flywheel.definition_changes
(
    revision     UInt64,
    kind         LowCardinality(String) COMMENT 'funnels | retention | segments | alerts | experiments | settings',
    name         String COMMENT 'the definition''s name ('''' for settings)',
    change       Enum8('added' = 1, 'changed' = 2, 'deleted' = 3),
    version      String COMMENT 'digest of the stored definition ('''' when deleted)',
    definition   String COMMENT 'JSON, as the metrics file writes it ('''' when deleted)',
    before       String COMMENT 'JSON: the definition it replaced ('''' when added)',
    author       String,
    via          LowCardinality(String) COMMENT 'ui | cli (flywheel metrics import) | file (a first start)',
    comment      String,
    at           DateTime64(3, 'UTC'),
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY revision;

-- Backfills of conditions new to the definitions (stages/backfill.py): one row per finished job.
CREATE TABLE IF NOT EXISTS flywheel.definition_backfills
(
    revision     UInt64 COMMENT 'the definitions revision that brought the conditions',
    predicates   Array(String) COMMENT 'condition ids (docs/design.md §8)',
    events       UInt64 COMMENT 'stored events sent back to their persons',
    started      DateTime64(3, 'UTC'),
    finished     DateTime64(3, 'UTC'),
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (revision, started);
