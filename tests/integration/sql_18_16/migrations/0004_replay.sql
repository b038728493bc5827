-- 18.16 shape of sql/migrations/0004_replay.sql (no column comments).
ALTER TABLE flywheel.invalid_events ADD COLUMN replay_of String DEFAULT '';
