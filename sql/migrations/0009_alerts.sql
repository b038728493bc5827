-- Alerts (docs/design.md §10): every transition the evaluators published to the alerts topic. A transition
-- published again after a crash has the same idempotency key: replaced.
CREATE TABLE IF NOT EXISTS flywheel.alert_events
(
    alert            LowCardinality(String),
    version          String COMMENT 'the rule''s version (docs/design.md §8)',
    state            Enum8('resolved' = 1, 'firing' = 2),
    idempotency_key  String COMMENT 'the same for every delivery of one transition (webhooks send it too)',
    period           DateTime64(3, 'UTC') COMMENT 'start of the period whose verdict made the transition',
    period_end       DateTime64(3, 'UTC'),
    since            Nullable(DateTime64(3, 'UTC')) COMMENT 'the period the new state began in',
    value            Nullable(Float64),
    count            Nullable(Float64) COMMENT 'the volume behind the value: the count, or a rate''s base',
    baseline         Nullable(Float64),
    lower            Nullable(Float64) COMMENT 'a value below this breached',
    upper            Nullable(Float64) COMMENT 'a value above this breached',
    score            Nullable(Float64) COMMENT 'anomaly: the robust z; relative: the change',
    reason           String,
    rule             LowCardinality(String) COMMENT 'threshold | relative | anomaly',
    series           String COMMENT 'JSON: what the rule watches',
    decided_at       DateTime64(3, 'UTC') COMMENT 'the evaluator''s clock when it decided',
    late             UInt8 COMMENT '1: decided more than the rule''s late_after after its period closed',
    superseded       UInt8 COMMENT '1: a newer transition of the rule was decided with it (not sent to webhooks)',
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (alert, idempotency_key);

-- Each rule's latest transition: firing now, or resolved since.
CREATE OR REPLACE VIEW flywheel.alert_states AS
SELECT alert, latest.1 AS state, latest.2 AS version, latest.3 AS period, latest.4 AS since, latest.5 AS value,
       latest.6 AS decided_at, latest.7 AS late
FROM (
    SELECT alert, argMax((state, version, period, since, value, decided_at, late), (period, decided_at)) AS latest
    FROM flywheel.alert_events FINAL
    GROUP BY alert
);
