"""Create Flywheel's topics when they are missing (the local broker does not auto-create)."""

from __future__ import annotations

import logging

from flywheel.config import Settings

log = logging.getLogger(__name__)


# The Faust tables (runtime/app.py). Their names make their changelog topics' names: renaming one loses state.
FIRST_SEEN = "message-ids"
IDENTITY = "identity"
PERSONS = "persons"
ALERTS = "alerts"
TABLES = (FIRST_SEEN, IDENTITY, PERSONS, ALERTS)


def changelog_topic(settings: Settings, table: str) -> str:
    return f"{settings.app_id}-{table}-changelog"  # Faust's naming


def ensure_topics(settings: Settings) -> list[str]:
    """Create every pipeline topic that does not exist yet; return the names created."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15000)
    try:
        existing = set(admin.list_topics())
        names = settings.topics
        # metrics.* hold absolute values keyed by (cell, partition), segments.changes membership changes keyed
        # by segment|person: compaction keeps the latest of each.
        compacted = {names.funnels, names.retention, names.active_users, names.lifecycle, names.experiments,
                     names.segments, names.rfm}
        # Faust creates its tables' changelogs itself, but a changelog created while the consumer group
        # forms can be missing from the first assignment (faust then crashes the agent with
        # PartitionsMismatch "changelog has 0 partitions"): create them up front, like Faust would.
        changelogs = [changelog_topic(settings, table) for table in TABLES]
        compacted |= set(changelogs)
        compacted.add(names.definitions)
        wanted = [t for t in [*names.model_dump().values(), *changelogs] if t not in existing]
        created = []
        for name in wanted:
            # the stored definitions: one partition, so their offsets order every change (the revision)
            partitions = 1 if name == names.definitions else settings.partitions
            try:
                admin.create_topics([
                    NewTopic(name, num_partitions=partitions, replication_factor=settings.replication,
                             topic_configs={"cleanup.policy": "compact"} if name in compacted else {})
                ])
                created.append(name)
            except TopicAlreadyExistsError:  # another worker was faster
                pass
        if created:
            log.info("created topics %s with %d partitions%s", created, settings.partitions,
                     " (definitions: 1)" if names.definitions in created else "")
        return created
    finally:
        admin.close()
