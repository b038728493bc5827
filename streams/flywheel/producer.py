"""A Python producer for backend services and tests: Segment-shaped events straight to events.raw.

    from flywheel.producer import Producer
    with Producer("127.0.0.1:9092", source="billing-service") as p:
        p.track(user_id="u1", event="Order Completed", properties={"order_id": "o1", "revenue": 9.5})

Keys follow docs/design.md §1 (anonymousId, else previousId for alias, else userId) so an anonymous id's
events and the call that links it share a partition. Every message gets a messageId (kept if given:
resending the same one is an idempotent retry) and the receivedAt/source headers the pipeline reads.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from flywheel.model.envelope import HEADER_RECEIVED_AT, HEADER_SOURCE, kafka_key


class Producer:
    def __init__(self, bootstrap: str, *, topic: str = "events.raw", source: str = "python-producer", **kafka: Any):
        from kafka import KafkaProducer

        self.topic = topic
        self.source = source.encode()
        options = {"acks": "all", "linger_ms": 20, "retries": 10, "max_in_flight_requests_per_connection": 1}
        options.update(kafka)
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, **options)

    def send_raw(self, value: bytes, *, key: str | None = None, received_at: datetime | None = None,
                 source: str | None = None, headers: list[tuple[str, bytes]] = ()) -> Any:
        """Send bytes as they are (valid or not): what an SDK retry or a broken client would send. `source`
        overrides the producer's (a DLQ replay keeps the original's); `headers` go along. Returns kafka-python's
        future: `.get()` raises if Kafka did not take the record."""
        received = received_at or datetime.now(UTC)
        headers = [
            (HEADER_SOURCE, source.encode() if source is not None else self.source),
            (HEADER_RECEIVED_AT, str(int(received.timestamp() * 1000)).encode()),
            *headers,
        ]
        return self._producer.send(self.topic, value=value, key=key.encode() if key else None, headers=headers)

    def send(self, message: dict[str, Any], *, received_at: datetime | None = None) -> str:
        """Send one Segment message (dict); returns its messageId."""
        message = dict(message)
        message.setdefault("messageId", str(uuid.uuid4()))
        message.setdefault("sentAt", _iso(received_at or datetime.now(UTC)))
        self.send_raw(orjson.dumps(message), key=kafka_key(message), received_at=received_at)
        return message["messageId"]

    def track(self, *, event: str, user_id: str | None = None, anonymous_id: str | None = None,
              properties: dict | None = None, timestamp: datetime | None = None, **extra: Any) -> str:
        return self.send(_compact({
            "type": "track", "event": event, "userId": user_id, "anonymousId": anonymous_id,
            "properties": properties or {}, "timestamp": _iso(timestamp) if timestamp else None, **extra,
        }))

    def identify(self, *, user_id: str, anonymous_id: str | None = None, traits: dict | None = None,
                 **extra: Any) -> str:
        return self.send(_compact({
            "type": "identify", "userId": user_id, "anonymousId": anonymous_id, "traits": traits or {}, **extra,
        }))

    def alias(self, *, previous_id: str, user_id: str, **extra: Any) -> str:
        return self.send({"type": "alias", "previousId": previous_id, "userId": user_id, **extra})

    def partitions(self) -> list[int]:
        """The topic's partitions, as its records are spread over them (runtime/partitioner.py)."""
        return sorted(self._producer.partitions_for(self.topic))

    def confirm(self, futures: list, timeout: float = 60) -> int:
        """Flush and wait until Kafka took every record `send_raw` returned a future for (raises if not)."""
        self.flush()
        for future in futures:
            future.get(timeout=timeout)
        return len(futures)

    def flush(self, timeout: float | None = 60) -> None:
        self._producer.flush(timeout=timeout)

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
