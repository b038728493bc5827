"""Every topic a worker subscribes to exists before the worker joins its consumer group.

Found by test_identity_two_workers.py (on 5e13b44, before main's fix): Faust created the tables'
changelog topics during start-up just before the consumer joined the group. When the consumer's
metadata did not list a just-created changelog yet, Faust's assignor logged "Ignoring missing topic"
and assigned none of its partitions; the table's source-partition check then saw 0 changelog
partitions, so every write to that table raised PartitionsMismatch, the ingest agent crashed on the
event and was restarted past it, until a metadata refresh (5 min) rebalanced. The crashed event is
acknowledged: it never reaches ClickHouse, not even after a restart (reproduced with a mismatched
changelog: 9 crashes, 9 events and their 9 links missing after the changelog was fixed and the
worker restarted). Seen in 1 of 15 fresh worker starts in a loop and in 4 of 5 runs of
test_identity_two_workers.py (in one, 59 events and 17 links lost).

main now creates the changelogs in ensure_topics from a list of table names (topics.TABLES). This
test takes the tables from the app itself, so a table added to runtime/app.py and not to that list fails here.
"""

from __future__ import annotations

import pytest
from flywheel.runtime.app import create_worker
from flywheel.runtime.topics import ensure_topics
from helpers import unique_settings, wait_until

pytestmark = pytest.mark.integration


def test_table_changelog_topics_exist_once_the_worker_has_made_its_topics(kafka, tmp_path):
    from kafka import KafkaAdminClient

    settings = unique_settings(kafka, tmp_path / "flywheel", partitions=8)
    app = create_worker(settings, None).app  # only to list its tables; nothing is started
    changelogs = sorted(table.changelog_topic.get_topic_name() for table in app.tables.values())
    assert len(changelogs) >= 2  # message-ids (dedup) and identity

    ensure_topics(settings)  # what `flywheel worker` runs before starting Faust (flywheel/worker.py)

    admin = KafkaAdminClient(bootstrap_servers=kafka, request_timeout_ms=15000)
    try:
        # A topic just created takes a moment to show in metadata (the very lag behind the race). Nothing
        # else creates these here, so a changelog ensure_topics did not create never shows.
        def missing() -> list[str]:
            existing = set(admin.list_topics())
            return [t for t in changelogs if t not in existing]

        try:
            wait_until(lambda: not missing(), timeout=30, what="the changelog topics in the cluster's metadata")
        except AssertionError:
            raise AssertionError(
                f"not created before the worker starts (Faust creates them, racing its group join): {missing()}"
            ) from None
        described = {t.get("name") or t.get("topic"): len(t["partitions"]) for t in admin.describe_topics(changelogs)}
        assert described == dict.fromkeys(changelogs, settings.partitions)
    finally:
        admin.close()
