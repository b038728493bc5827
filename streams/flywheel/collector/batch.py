"""A request body → the events it carries, each completed with what the request knows.

- `/v1/batch` carries `batch: [...]`; `/v1/<type>` carries one event whose type is the path's.
- Batch-level `context` and `integrations` merge into every item (the item's keys win); the batch
  `sentAt` goes into items that lack one, so validate can correct clock skew per item (docs/design.md §2).
- `context.ip` is the caller's address unless the event says otherwise.
- `writeKey` is a secret: it never goes further than here.

Items that are not even objects are passed on untouched: validate sends them to the DLQ with a
reason, like any other semantically invalid event of an accepted request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from flywheel.collector.outcomes import Record, bad_request
from flywheel.model.envelope import MESSAGE_TYPES, json_type, kafka_key

KINDS = ("batch", *sorted(MESSAGE_TYPES))


@dataclass(frozen=True, slots=True)
class Shared:
    """What every event of one request inherits."""

    context: dict[str, Any] = field(default_factory=dict)
    integrations: dict[str, Any] = field(default_factory=dict)
    sent_at: Any = None
    ip: str | None = None


def split(kind: str, body: dict[str, Any], *, ip: str | None) -> tuple[list[Any], Shared]:
    """The items of a request and what they share. `kind` is the path: batch, track, identify, …"""
    if kind == "batch":
        items = body.get("batch")
        if not isinstance(items, list):
            got = "missing" if items is None else _a(json_type(items))
            raise bad_request("invalid_batch", f"'batch' must be an array of events, got {got}")
        return items, Shared(
            context=_object_or_reject(body, "context"),
            integrations=_object_or_reject(body, "integrations"),
            sent_at=body.get("sentAt"),
            ip=ip,
        )
    if kind not in MESSAGE_TYPES:
        raise bad_request("unknown_path", f"no such endpoint /v1/{kind[:40]}")
    return [{**body, "type": kind}], Shared(ip=ip)


def complete(item: Any, shared: Shared) -> Any:
    """One item with the request's shared fields merged in (the item's own keys win). A new dict:
    the item itself is not changed."""
    if type(item) is not dict:
        return item
    out = item.copy()
    if "writeKey" in out:
        del out["writeKey"]
    context = _merge(shared.context, out.get("context"))
    if shared.ip and (context is None or type(context) is dict and "ip" not in context):
        context = {**context, "ip": shared.ip} if context else {"ip": shared.ip}
    if context is not None:
        out["context"] = context
    if shared.integrations:
        out["integrations"] = _merge(shared.integrations, out.get("integrations"))
    if shared.sent_at is not None and out.get("sentAt") is None:
        out["sentAt"] = shared.sent_at
    return out


def encode(items: list[Any], *, max_event_bytes: int) -> list[Record]:
    """JSON bytes and Kafka key per item; one event over the limit rejects the whole request."""
    records = []
    for i, item in enumerate(items):
        try:
            value = orjson.dumps(item)
        except orjson.JSONEncodeError:  # read up to 1024 levels deep, written only up to 253
            raise bad_request("invalid_batch", f"event {i} is nested too deeply to be stored") from None
        if len(value) > max_event_bytes:
            raise bad_request(
                "event_too_large",
                f"event {i} is {len(value)} bytes, over the limit of {max_event_bytes} bytes per event",
            )
        if type(item) is not dict:
            records.append(Record(None, value))
            continue
        # the usual key, looked up first; an alias is keyed by its previousId (kafka_key), even when it
        # also carries an anonymousId (analytics.js always sends one)
        anonymous_id = item.get("anonymousId")
        fast = type(anonymous_id) is str and anonymous_id and item.get("type") != "alias"
        key = anonymous_id if fast else kafka_key(item)
        records.append(Record(key.encode("utf-8") if key else None, value))
    return records


def _merge(shared: dict[str, Any], own: Any) -> Any:
    if own is None:
        return dict(shared) if shared else None
    if type(own) is not dict:
        return own  # wrong type: validate reports it
    return {**shared, **own} if shared else own


def _object_or_reject(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("invalid_batch", f"batch-level '{name}' must be an object, got {_a(json_type(value))}")
    return value


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun
