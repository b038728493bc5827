-- 18.16's shape of sql/migrations/0012_definition_versions.sql: the column (this server cannot add it to the
-- sorting key; the transport test needs no versions kept apart).
ALTER TABLE flywheel.funnel_partials ADD COLUMN definition_version String DEFAULT '' AFTER funnel;
ALTER TABLE flywheel.retention_partials ADD COLUMN definition_version String DEFAULT '' AFTER retention;
