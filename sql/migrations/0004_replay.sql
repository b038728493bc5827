-- DLQ replay (flywheel dlq replay): a replayed record rejected again names the rejected record it replays.
ALTER TABLE flywheel.invalid_events
    ADD COLUMN IF NOT EXISTS replay_of String DEFAULT '' COMMENT 'a replay: origin of the record first rejected';
