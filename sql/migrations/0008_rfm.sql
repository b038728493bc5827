-- RFM (docs/design.md §9): each person's summary as the stream last published it on segments.rfm — the
-- newest order in the window, frequency and monetary; frequency 0 once no order is left in the window.
-- The latest record per person wins (one person's records are on one partition, in order).
CREATE TABLE IF NOT EXISTS flywheel.rfm_values
(
    person_id        String,
    user             UInt8 COMMENT '1: the person id is a userId, else an anonymousId',
    last_order       Nullable(DateTime64(3, 'UTC')),
    frequency        UInt32,
    monetary         Float64,
    at               DateTime64(3, 'UTC') COMMENT 'the worker''s clock when the summary changed',
    kafka_partition  UInt16,
    kafka_offset     UInt64,
    inserted_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(kafka_offset)
ORDER BY person_id;

-- Every person with an order in the window now: recency, frequency, monetary, their 1-5 scores by global
-- quintiles (cut k = the value at rank ceil(k·n/5); a score is 1 + the cuts below it, recency reversed) and
-- the R×F segment — what the RFM leader decides from, computed at query time.
CREATE OR REPLACE VIEW flywheel.rfm AS
WITH people AS (
    SELECT person_id, intDiv(toUnixTimestamp64Milli(now64(3)) - toUnixTimestamp64Milli(last_order), 86400000)
               AS recency_days,
           frequency, monetary
    FROM flywheel.rfm_values FINAL
    WHERE frequency > 0
),
all_cuts AS (
    SELECT count() AS n, arraySort(groupArray(recency_days)) AS rs, arraySort(groupArray(frequency)) AS fs,
           arraySort(groupArray(monetary)) AS ms
    FROM people
)
SELECT person_id, recency_days, frequency, monetary, r, f, m,
       multiIf(r <= 2 AND f <= 2, 'hibernating', r <= 2 AND f <= 4, 'at_risk', r <= 2, 'cant_lose',
               r = 3 AND f <= 2, 'about_to_sleep', r = 3 AND f = 3, 'need_attention', r <= 4 AND f >= 4, 'loyal',
               r = 4 AND f = 1, 'promising', r = 5 AND f = 1, 'new', f <= 3, 'potential_loyalist',
               'champions') AS segment
FROM (
    SELECT person_id, recency_days, frequency, monetary,
           5 - arrayCount(c -> c < recency_days, [rs[greatest(1, intDiv(n + 4, 5))], rs[greatest(1, intDiv(2 * n + 4, 5))],
                                                  rs[greatest(1, intDiv(3 * n + 4, 5))], rs[greatest(1, intDiv(4 * n + 4, 5))]]) AS r,
           1 + arrayCount(c -> c < frequency, [fs[greatest(1, intDiv(n + 4, 5))], fs[greatest(1, intDiv(2 * n + 4, 5))],
                                               fs[greatest(1, intDiv(3 * n + 4, 5))], fs[greatest(1, intDiv(4 * n + 4, 5))]]) AS f,
           1 + arrayCount(c -> c < monetary, [ms[greatest(1, intDiv(n + 4, 5))], ms[greatest(1, intDiv(2 * n + 4, 5))],
                                              ms[greatest(1, intDiv(3 * n + 4, 5))], ms[greatest(1, intDiv(4 * n + 4, 5))]]) AS m
    FROM people CROSS JOIN all_cuts
);
