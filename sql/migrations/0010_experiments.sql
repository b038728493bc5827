-- Experiments (the metrics file's `experiments:`; docs/design.md §11): per (experiment, variation, metric)
-- the sufficient statistics over the exposed persons of one partition of events.identified, from
-- metrics.experiments; the view sums the latest version of each partition.
--
-- y is the metric's value per person (conversion 0/1, a count, a sum in millionths of the property's
-- unit); x is a ratio metric's denominator (0 otherwise); p is CUPED's covariate, y over the lookback before
-- the exposure (0 without `cuped:`). Integers: the sums over partitions are exact.
-- The row with variation = '' and metric = '' counts in n the persons excluded (exposed to more than one
-- variation).
CREATE TABLE IF NOT EXISTS flywheel.experiment_partials
(
    experiment       LowCardinality(String),
    variation        String,
    metric           LowCardinality(String),
    kafka_partition  UInt16,
    n                UInt64 COMMENT 'exposed persons',
    sy               Int256 COMMENT 'Σy',
    syy              Int256 COMMENT 'Σy²',
    sx               Int256 COMMENT 'Σx (ratio metrics)',
    sxx              Int256 COMMENT 'Σx²',
    sxy              Int256 COMMENT 'Σxy',
    sp               Int256 COMMENT 'Σp: CUPED''s covariate, the metric before the exposure (with cuped:)',
    spp              Int256 COMMENT 'Σp²',
    spy              Int256 COMMENT 'Σpy',
    version          UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (experiment, variation, metric, kafka_partition);

-- The live statistics: `flywheel experiments results NAME` computes the results from them.
CREATE OR REPLACE VIEW flywheel.experiment_stats AS
SELECT experiment, variation, metric, sum(s.1) AS n, sum(s.2) AS sy, sum(s.3) AS syy, sum(s.4) AS sx,
       sum(s.5) AS sxx, sum(s.6) AS sxy, sum(s.7) AS sp, sum(s.8) AS spp, sum(s.9) AS spy
FROM
(
    SELECT experiment, variation, metric, kafka_partition, argMax((n, sy, syy, sx, sxx, sxy, sp, spp, spy), version) AS s
    FROM flywheel.experiment_partials
    GROUP BY experiment, variation, metric, kafka_partition
)
GROUP BY experiment, variation, metric
HAVING n > 0
ORDER BY experiment, variation, metric;
