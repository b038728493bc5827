-- A funnel's and a retention's cells per version of the definition (docs/design.md §13): a changed definition
-- counts anew under its new version, and the old version's cells stay readable (the *_versions views) until
-- deleted (flywheel metrics drop-version). Rows written before this migration carry no version ('') and
-- count for whatever version of their definition is current.
ALTER TABLE flywheel.funnel_partials
    ADD COLUMN IF NOT EXISTS definition_version LowCardinality(String) AFTER funnel,
    MODIFY ORDER BY (funnel, day, step, kafka_partition, definition_version);
ALTER TABLE flywheel.retention_partials
    ADD COLUMN IF NOT EXISTS definition_version LowCardinality(String) AFTER retention,
    MODIFY ORDER BY (retention, cohort_day, period, kafka_partition, definition_version);

-- Every version's cells.
CREATE OR REPLACE VIEW flywheel.funnel_daily_versions AS
SELECT funnel, definition_version, day, step, sum(persons) AS persons
FROM
(
    SELECT funnel, definition_version, day, step, kafka_partition, argMax(persons, version) AS persons
    FROM flywheel.funnel_partials
    GROUP BY funnel, definition_version, day, step, kafka_partition
)
GROUP BY funnel, definition_version, day, step
HAVING persons > 0;

-- The current version of each funnel: the one its newest row was published under.
CREATE OR REPLACE VIEW flywheel.funnel_current_versions AS
SELECT funnel, argMax(definition_version, inserted_at) AS current_version
FROM flywheel.funnel_partials WHERE definition_version != '' GROUP BY funnel;

-- The current version's cells (a row of no version stands in where the current version has none).
CREATE OR REPLACE VIEW flywheel.funnel_daily AS
SELECT funnel, day, step, sum(persons) AS persons
FROM
(
    SELECT funnel, day, step, kafka_partition, argMax(persons, (definition_version != '', version)) AS persons
    FROM flywheel.funnel_partials
    WHERE definition_version = '' OR (funnel, definition_version) IN (SELECT funnel, current_version
                                                                      FROM flywheel.funnel_current_versions)
    GROUP BY funnel, day, step, kafka_partition
)
GROUP BY funnel, day, step
HAVING persons > 0;

CREATE OR REPLACE VIEW flywheel.retention_current_versions AS
SELECT retention, argMax(definition_version, inserted_at) AS current_version
FROM flywheel.retention_partials WHERE definition_version != '' GROUP BY retention;

CREATE OR REPLACE VIEW flywheel.retention_daily_versions AS
WITH cells AS
(
    SELECT retention, definition_version, cohort_day, period, sum(persons) AS persons
    FROM
    (
        SELECT retention, definition_version, cohort_day, period, kafka_partition, argMax(persons, version) AS persons
        FROM flywheel.retention_partials
        GROUP BY retention, definition_version, cohort_day, period, kafka_partition
    )
    GROUP BY retention, definition_version, cohort_day, period
)
SELECT r.retention AS retention, r.definition_version AS definition_version, r.cohort_day AS cohort_day,
       r.period AS period, r.persons AS persons, s.persons AS cohort_size
FROM cells AS r
INNER JOIN (SELECT retention, definition_version, cohort_day, persons FROM cells WHERE period = 0) AS s
    ON s.retention = r.retention AND s.definition_version = r.definition_version AND s.cohort_day = r.cohort_day
WHERE r.period > 0 AND r.persons > 0;

CREATE OR REPLACE VIEW flywheel.retention_daily AS
WITH cells AS
(
    SELECT retention, cohort_day, period, sum(persons) AS persons
    FROM
    (
        SELECT retention, cohort_day, period, kafka_partition,
               argMax(persons, (definition_version != '', version)) AS persons
        FROM flywheel.retention_partials
        WHERE definition_version = '' OR (retention, definition_version) IN (
            SELECT retention, current_version FROM flywheel.retention_current_versions)
        GROUP BY retention, cohort_day, period, kafka_partition
    )
    GROUP BY retention, cohort_day, period
)
SELECT r.retention AS retention, r.cohort_day AS cohort_day, r.period AS period, r.persons AS persons,
       s.persons AS cohort_size
FROM cells AS r
INNER JOIN (SELECT retention, cohort_day, persons FROM cells WHERE period = 0) AS s
    ON s.retention = r.retention AND s.cohort_day = r.cohort_day
WHERE r.period > 0 AND r.persons > 0;
