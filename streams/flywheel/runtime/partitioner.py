"""The one partitioner: where Kafka's default partitioner (murmur2 of the key, as in the Java client,
kafka-python and aiokafka) puts a keyed record, so a key lands on the same partition whoever
produces it — the collector, a stage's outbox, flywheel.producer."""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from aiokafka.partitioner import murmur2


def partition_for(key: bytes | None, partitions: Sequence[int]) -> int:
    """The partition of `key` among a topic's `partitions`; a record without a key goes anywhere."""
    if key is None:
        return random.choice(partitions)
    return partitions[key_hash(key) % len(partitions)]


def partition_of(key: bytes, count: int) -> int:
    """The partition of `key` in a topic of `count` partitions."""
    return key_hash(key) % count


@functools.lru_cache(maxsize=100_000)
def key_hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF  # pure Python (~9 µs); ids repeat, so cache
