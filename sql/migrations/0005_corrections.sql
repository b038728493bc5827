-- Forgetting a person (flywheel persons forget, docs/design.md §3): a closed cell the person counted in is
-- republished one lower, marked with the request it corrects for (also what makes the correction
-- idempotent: a retry finds its own row).
ALTER TABLE flywheel.funnel_partials
    ADD COLUMN IF NOT EXISTS correction String DEFAULT '' COMMENT 'the forget request this row corrects for';
ALTER TABLE flywheel.retention_partials
    ADD COLUMN IF NOT EXISTS correction String DEFAULT '' COMMENT 'the forget request this row corrects for';
ALTER TABLE flywheel.active_user_partials
    ADD COLUMN IF NOT EXISTS correction String DEFAULT '' COMMENT 'the forget request this row corrects for';
