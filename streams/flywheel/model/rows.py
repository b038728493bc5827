"""Topic records → ClickHouse rows (column name → Python value); metric cells' rows are metrics/cells.py's."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from flywheel.model.clock import from_ms
from flywheel.model.envelope import AUDIENCE_ENTERED


def _json(value: Any) -> str:
    return orjson.dumps(value or {}).decode()


def event_row(event: dict[str, Any]) -> dict[str, Any]:
    sent = event.get("sentAt")
    return {
        "message_id": event["messageId"],
        "type": event["type"],
        "event": event["event"],
        "anonymous_id": event["anonymousId"],
        "user_id": event["userId"],
        "person_id": event["personId"],
        "previous_id": event["previousId"],
        "group_id": event["groupId"],
        "timestamp": from_ms(event["timestamp"]),
        "received_at": from_ms(event["receivedAt"]),
        "sent_at": from_ms(sent) if sent is not None else None,
        "properties": _json(event["properties"]),
        "traits": _json(event["traits"]),
        "context": _json(event["context"]),
        "source": event["source"],
        "late": 1 if event.get("late") else 0,
    }


def invalid_row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "received_at": from_ms(record["receivedAt"]),
        "source": record["source"],
        "reasons": list(record["reasons"]),
        "payload": record["payload"],
        "payload_encoding": record["payloadEncoding"],
        "origin": record["origin"],
        "replay_of": record.get("replayOf", ""),
    }


def identity_rows(change: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An identity.changes record → (table, row)."""
    at = from_ms(change["timestamp"])
    if change["type"] == "link":
        return "flywheel.identity_map", {
            "distinct_id": change["anonymousId"], "person_id": change["userId"], "version": change["timestamp"],
            "message_id": change["messageId"], "linked_at": at,
        }
    return "flywheel.identity_conflicts", {
        "anonymous_id": change["anonymousId"], "linked_to": change["linkedTo"], "refused": change["refused"],
        "message_id": change["messageId"], "at": at,
    }


def audience_row(record: dict[str, Any], partition: int, offset: int) -> dict[str, Any]:
    """A segments.changes record (metrics/segments.py audience_record) at `partition`@`offset` → a
    flywheel.segment_changes row."""
    props = record["properties"]
    return {
        "segment": props["segment"], "version": props["version"], "person_id": props["person_id"],
        "user_id": record["userId"] or "", "anonymous_id": record["anonymousId"] or "",
        "change": "entered" if record["event"] == AUDIENCE_ENTERED else "exited",
        "at": datetime.fromisoformat(record["timestamp"]), "since": datetime.fromisoformat(props["since"]),
        "message_id": record["messageId"], "kafka_partition": partition, "kafka_offset": offset,
    }


def rfm_row(record: dict[str, Any], partition: int, offset: int) -> dict[str, Any]:
    """A segments.rfm record (metrics/rfm.py summary_record) at `partition`@`offset` → a flywheel.rfm_values row."""
    last = record["lastOrder"]
    return {"person_id": record["person"], "user": 1 if record.get("user") else 0,
            "last_order": datetime.fromisoformat(last) if last else None,
            "frequency": record["frequency"], "monetary": record["monetary"],
            "at": datetime.fromisoformat(record["at"]), "kafka_partition": partition, "kafka_offset": offset}


def alert_row(record: dict[str, Any]) -> dict[str, Any]:
    """An alerts record (metrics/alerts.py transition_record) → a flywheel.alert_events row."""
    def when(text: str | None) -> datetime | None:
        return datetime.fromisoformat(text) if text else None

    return {
        "alert": record["alert"], "version": record["version"], "state": record["state"],
        "idempotency_key": record["idempotencyKey"], "period": when(record["period"]),
        "period_end": when(record["periodEnd"]), "since": when(record.get("since")),
        **{k: record.get(k) for k in ("value", "count", "baseline", "lower", "upper", "score")},
        "reason": record.get("reason", ""), "rule": record["rule"], "series": _json(record["series"]),
        "decided_at": when(record["decidedAt"]), "late": int(bool(record.get("late"))),
        "superseded": int(bool(record.get("superseded"))),
    }


def definition_row(change: dict[str, Any], offset: int) -> dict[str, Any]:
    """A definitions record (metrics/store.py Change) at `offset` → a flywheel.definition_changes row."""
    return {
        "revision": offset, "kind": change["kind"], "name": change["name"],
        "change": "deleted" if change["spec"] is None else ("added" if change.get("before") is None else "changed"),
        "version": change.get("version", ""), "definition": _json_or_empty(change["spec"]),
        "before": _json_or_empty(change.get("before")), "author": change["author"], "via": change["via"],
        "comment": change.get("comment", ""), "at": from_ms(change["at"]),
    }


def _json_or_empty(value: Any) -> str:
    return "" if value is None else orjson.dumps(value).decode()
