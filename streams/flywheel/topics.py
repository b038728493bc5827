"""Create Flywheel's topics when they are missing (the local broker does not auto-create)."""

from __future__ import annotations

import logging

from flywheel.config import Settings

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings) -> list[str]:
    """Create every pipeline topic that does not exist yet; return the names created."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15000)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in settings.topics.model_dump().values() if t not in existing]
        created = []
        for name in wanted:
            try:
                admin.create_topics([
                    NewTopic(name, num_partitions=settings.partitions, replication_factor=settings.replication)
                ])
                created.append(name)
            except TopicAlreadyExistsError:  # another worker was faster
                pass
        if created:
            log.info("created topics %s with %d partitions", created, settings.partitions)
        return created
    finally:
        admin.close()
