-- Identity (docs/design.md §3): which person each anonymous id belongs to, from identity.changes.
-- Only first links are ever written (the stream refuses conflicting ones), so a distinct id has one
-- person; a redelivered link is the same row and collapses.
CREATE TABLE IF NOT EXISTS flywheel.identity_map
(
    distinct_id  String COMMENT 'an anonymous id (or alias previousId)',
    person_id    String COMMENT 'the user id it belongs to',
    version      UInt64 COMMENT 'event time of the linking call, epoch ms (earliest = the link)',
    message_id   String COMMENT 'the call that linked them',
    linked_at    DateTime64(3, 'UTC'),
    inserted_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY distinct_id;

-- Refused links: an anonymous id already linked to another user (it does not move).
CREATE TABLE IF NOT EXISTS flywheel.identity_conflicts
(
    anonymous_id  String,
    linked_to     String COMMENT 'the user the id stays with',
    refused       String COMMENT 'the user the refused call named',
    message_id    String,
    at            DateTime64(3, 'UTC'),
    inserted_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (anonymous_id, message_id);

-- Every event with today's person: its user id if it has one, else the user its anonymous id was
-- linked to (even if the link came after the event), else the anonymous id.
CREATE OR REPLACE VIEW flywheel.events_resolved AS
SELECT
    e.message_id AS message_id,
    e.type AS type,
    e.event AS event,
    e.anonymous_id AS anonymous_id,
    e.user_id AS user_id,
    if(e.user_id != '', e.user_id, if(m.person_id != '', m.person_id, if(e.anonymous_id != '', e.anonymous_id, e.previous_id))) AS person_id,
    e.person_id AS person_id_at_ingestion,
    e.previous_id AS previous_id,
    e.group_id AS group_id,
    e.timestamp AS timestamp,
    e.received_at AS received_at,
    e.properties AS properties,
    e.traits AS traits,
    e.context AS context,
    e.source AS source,
    e.late AS late
FROM flywheel.events AS e FINAL
LEFT JOIN
(
    SELECT distinct_id, argMin(person_id, version) AS person_id
    FROM flywheel.identity_map
    GROUP BY distinct_id
) AS m ON m.distinct_id = if(e.anonymous_id != '', e.anonymous_id, e.previous_id)
SETTINGS join_use_nulls = 0;
