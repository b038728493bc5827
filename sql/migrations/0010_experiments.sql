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
    control          UInt8 COMMENT '1: the variation is the control',
    kind             LowCardinality(String) COMMENT 'conversion | count | sum | ratio',
    scale_y          UInt32 COMMENT 'y and p are kept in 1/scale_y of the property''s unit (1: a count)',
    scale_x          UInt32 COMMENT 'x likewise',
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

-- Each variation against the control, per metric, at the large-sample (normal) approximation: means in the
-- property's unit, the absolute and relative lift with 95 % intervals and two-sided p-values (Welch's
-- variances, unpooled; relative lift and ratio metrics by the delta method). Without CUPED. The full results —
-- Welch's t, the anytime-valid interval to act on while watching, chance to win, expected loss, the
-- sample-ratio check, guardrails, CUPED — are `flywheel experiments results NAME` and the admin endpoint.
CREATE OR REPLACE VIEW flywheel.experiment_results AS
WITH arms AS
(
    SELECT experiment, variation, metric, kind, control, n,
           if(kind = 'ratio', y / x, y / n) AS mean,
           (yy - y * y / n) / (n - 1) AS var_y,
           (xx - x * x / n) / (n - 1) AS var_x,
           (xy - x * y / n) / (n - 1) AS cov_xy,
           multiIf(kind = 'conversion', mean * (1 - mean),
                   kind = 'ratio', var_y / pow(x / n, 2) - 2 * cov_xy * (y / n) / pow(x / n, 3)
                                   + pow(y / n, 2) * var_x / pow(x / n, 4),
                   var_y) AS variance
    FROM
    (
        SELECT experiment, variation, metric, any(kind) AS kind, max(control) AS control, toFloat64(sum(s.1)) AS n,
               toFloat64(sum(s.2)) / any(scale_y) AS y, toFloat64(sum(s.3)) / pow(any(scale_y), 2) AS yy,
               toFloat64(sum(s.4)) / any(scale_x) AS x, toFloat64(sum(s.5)) / pow(any(scale_x), 2) AS xx,
               toFloat64(sum(s.6)) / (any(scale_x) * any(scale_y)) AS xy
        FROM
        (
            SELECT experiment, variation, metric, kafka_partition, argMax((n, sy, syy, sx, sxx, sxy), version) AS s,
                   argMax(control, version) AS control, argMax(kind, version) AS kind,
                   argMax(scale_y, version) AS scale_y, argMax(scale_x, version) AS scale_x
            FROM flywheel.experiment_partials
            WHERE metric != ''
            GROUP BY experiment, variation, metric, kafka_partition
        )
        GROUP BY experiment, variation, metric
        HAVING n > 1
    )
)
SELECT v.experiment AS experiment, v.metric AS metric, v.kind AS kind, v.variation AS variation,
       toUInt64(v.n) AS n, v.mean AS mean, c.variation AS control, toUInt64(c.n) AS control_n, c.mean AS control_mean,
       v.mean - c.mean AS lift,
       sqrt(v.variance / v.n + c.variance / c.n) AS lift_se,
       lift - 1.959963984540054 * lift_se AS lift_lower,
       lift + 1.959963984540054 * lift_se AS lift_upper,
       erfc(abs(lift / lift_se) / sqrt(2)) AS p_value,
       (v.mean - c.mean) / c.mean AS relative_lift,
       sqrt(v.variance / (pow(c.mean, 2) * v.n) + c.variance * pow(v.mean, 2) / (pow(c.mean, 4) * c.n)) AS relative_se,
       relative_lift - 1.959963984540054 * relative_se AS relative_lower,
       relative_lift + 1.959963984540054 * relative_se AS relative_upper,
       erfc(abs(relative_lift / relative_se) / sqrt(2)) AS relative_p_value
FROM arms AS v
INNER JOIN arms AS c ON v.experiment = c.experiment AND v.metric = c.metric AND c.control = 1
WHERE v.control = 0
ORDER BY experiment, metric, variation;
