-- 18.16 shape of sql/migrations/0005_corrections.sql (no column comments).
ALTER TABLE flywheel.funnel_partials ADD COLUMN correction String DEFAULT '';
ALTER TABLE flywheel.retention_partials ADD COLUMN correction String DEFAULT '';
ALTER TABLE flywheel.active_user_partials ADD COLUMN correction String DEFAULT '';
