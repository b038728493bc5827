-- Segments (docs/design.md §9): every membership change the stream published to segments.changes.
-- A change published again after a crash has the same (segment, person_id, at, change): replaced.
CREATE TABLE IF NOT EXISTS flywheel.segment_changes
(
    segment       LowCardinality(String),
    version       String COMMENT 'the segment definition''s version (docs/design.md §8)',
    person_id     String,
    user_id       String COMMENT 'the person id when it is a userId',
    anonymous_id  String COMMENT 'the person id when it is an anonymousId',
    change        Enum8('exited' = 1, 'entered' = 2),
    at            DateTime64(3, 'UTC') COMMENT 'when the worker decided the change (its clock)',
    since         DateTime64(3, 'UTC') COMMENT 'when the membership began',
    message_id    String COMMENT 'the Audience Entered / Exited event''s messageId',
    kafka_partition UInt16,
    kafka_offset  UInt64 COMMENT 'of the record in segments.changes: orders a person''s changes of a segment',
    inserted_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (segment, person_id, at, change);

-- Current members: a person's latest change per segment is an entry. Latest by the record's offset: one
-- segment|person key is always on one partition of the topic, in the order the changes were decided (the
-- workers' clocks may disagree after a partition moves).
CREATE OR REPLACE VIEW flywheel.segment_members AS
SELECT segment, person_id, argMax(since, kafka_offset) AS since,
       argMax(user_id, kafka_offset) AS user_id, argMax(anonymous_id, kafka_offset) AS anonymous_id
FROM flywheel.segment_changes
GROUP BY segment, person_id
HAVING argMax(change, kafka_offset) = 'entered';

-- Per segment and UTC day, from its first change to today: members at the end of the day (today: now),
-- and how many persons entered and left that day. It evaluates persons × days: for a long history, filter
-- on segment and day.
CREATE OR REPLACE VIEW flywheel.segment_sizes_daily AS
SELECT segment, day, countIf(last = 'entered') AS persons, countIf(entered_that_day) AS entered,
       countIf(exited_that_day) AS exited
FROM (
    SELECT c.segment AS segment, d.day AS day, c.person_id AS person_id,
           argMax(c.change, c.kafka_offset) AS last,
           countIf(c.change = 'entered' AND toDate(c.at) = d.day) > 0 AS entered_that_day,
           countIf(c.change = 'exited' AND toDate(c.at) = d.day) > 0 AS exited_that_day
    FROM flywheel.segment_changes AS c
    INNER JOIN (
        SELECT segment, arrayJoin(arrayMap(x -> toDate(x), range(toUInt32(min(toDate(at))), toUInt32(today()) + 1))) AS day
        FROM flywheel.segment_changes
        GROUP BY segment
    ) AS d ON d.segment = c.segment
    WHERE toDate(c.at) <= d.day
    GROUP BY segment, day, person_id
)
GROUP BY segment, day
ORDER BY segment, day;
