"""Validate stage: one raw Kafka record → `Valid(event)` or `Invalid(reasons)`. Pure; never raises.

Every record ends in exactly one of the two outcomes, so received = valid + invalid holds by
construction. The valid outcome is the normalised event (the documented value of
`events.identified`); the invalid one keeps the original bytes for the DLQ.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from flywheel import envelope, identity
from flywheel.envelope import MESSAGE_TYPES, BadTimestamp
from flywheel.plan import TrackingPlan

_MIN_TIME = datetime.fromisoformat("1970-01-01T00:00:00+00:00")


@dataclass(frozen=True, slots=True)
class Raw:
    """A record of events.raw with where it came from."""

    value: bytes
    source: str
    received_at: datetime
    topic: str = ""
    partition: int = -1
    offset: int = -1

    @property
    def origin(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(frozen=True, slots=True)
class Valid:
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Invalid:
    reasons: list[str]
    raw: Raw

    def dlq_record(self) -> dict[str, Any]:
        """The documented value of events.invalid."""
        try:
            payload, encoding = self.raw.value.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(self.raw.value).decode(), "base64"
        return {
            "receivedAt": envelope.to_ms(self.raw.received_at),
            "source": self.raw.source,
            "reasons": self.reasons,
            "payload": payload,
            "payloadEncoding": encoding,
            "origin": self.raw.origin,
        }


@dataclass(frozen=True, slots=True)
class Limits:
    max_event_bytes: int = 32 * 1024
    max_future: timedelta = timedelta(days=1)


def validate(raw: Raw, plan: TrackingPlan, limits: Limits = Limits()) -> Valid | Invalid:
    try:
        return _validate(raw, plan, limits)
    except Exception as exc:  # a bug here must not lose the event: it goes to the DLQ, loudly named
        return Invalid([f"internal validation error: {type(exc).__name__}: {exc}"], raw)


def _validate(raw: Raw, plan: TrackingPlan, limits: Limits) -> Valid | Invalid:
    size = len(raw.value)
    if size > limits.max_event_bytes:
        return Invalid([f"event is {size} bytes, over the {limits.max_event_bytes}-byte limit"], raw)
    try:
        msg = orjson.loads(raw.value)
    except orjson.JSONDecodeError as exc:
        return Invalid([f"malformed JSON: {exc}"], raw)
    if not isinstance(msg, dict):
        return Invalid([f"expected a JSON object, got {type(msg).__name__}"], raw)

    reasons: list[str] = []
    mtype = msg.get("type")
    if mtype is None:
        reasons.append("missing 'type'")
    elif not isinstance(mtype, str) or mtype not in MESSAGE_TYPES:
        reasons.append(f"unknown type {str(mtype)[:40]!r} (expected one of {', '.join(sorted(MESSAGE_TYPES))})")

    ids = {}
    for field in ("userId", "anonymousId", "previousId", "groupId"):
        value = msg.get(field)
        if value is None:
            ids[field] = ""
            continue
        parsed = envelope.as_id(value)
        if parsed is None:
            reasons.append(f"{field} must be a string, got {type(value).__name__}")
            ids[field] = ""
        else:
            ids[field] = parsed
    if mtype == "alias":
        if not ids["previousId"]:
            reasons.append("alias needs 'previousId'")
        if not ids["userId"]:
            reasons.append("alias needs 'userId'")
    elif not ids["userId"] and not ids["anonymousId"]:
        reasons.append("neither 'userId' nor 'anonymousId' is set")
    junk = identity.junk_id_reason(ids)
    if junk:
        reasons.append(junk)
    if mtype == "group" and not ids["groupId"]:
        reasons.append("group needs 'groupId'")

    name = ""
    if mtype == "track":
        event = msg.get("event")
        if not isinstance(event, str) or not event.strip():
            reasons.append("track needs a non-empty string 'event'")
        else:
            name = event
    elif mtype in ("page", "screen"):
        page = msg.get("name")
        if page is not None and not isinstance(page, str):
            reasons.append(f"'name' must be a string, got {type(page).__name__}")
        elif page:
            name = page

    objects = {}
    for field in ("properties", "traits", "context"):
        value = msg.get(field)
        if value is None:
            objects[field] = {}
        elif not isinstance(value, dict):
            reasons.append(f"'{field}' must be an object, got {type(value).__name__}")
            objects[field] = {}
        else:
            objects[field] = value
    # identify/group carry traits at the top level in the spec; older SDKs put them in context.
    if mtype in ("identify", "group") and not objects["traits"]:
        ctx_traits = objects["context"].get("traits")
        if isinstance(ctx_traits, dict):
            objects["traits"] = ctx_traits

    ts = None
    try:
        ts = envelope.event_time(msg, raw.received_at)
        sent = envelope.parse_time(msg.get("sentAt"), "sentAt")
    except BadTimestamp as exc:
        reasons.append(str(exc))
        sent = None
    if ts is not None:
        if ts > raw.received_at + limits.max_future:
            ahead = (ts - raw.received_at).total_seconds()
            reasons.append(
                f"timestamp {ts.isoformat()} is {ahead:.0f}s after receivedAt "
                f"(limit {limits.max_future.total_seconds():.0f}s): check the client clock"
            )
        elif ts < _MIN_TIME:
            reasons.append(f"timestamp {ts.isoformat()} is before 1970")

    message_id = msg.get("messageId")
    if message_id is None or message_id == "":
        # Segment assigns one server-side; ours is derived from the bytes so a byte-identical
        # retry still deduplicates.
        message_id = "fw-" + hashlib.blake2b(raw.value, digest_size=16).hexdigest()
    elif envelope.as_id(message_id) is None:
        reasons.append(f"messageId must be a string, got {type(message_id).__name__}")
    else:
        message_id = envelope.as_id(message_id)

    if mtype == "track" and name:
        reasons.extend(plan.check_track(name, objects["properties"]))

    if reasons:
        return Invalid(reasons, raw)
    assert ts is not None
    return Valid({
        "messageId": message_id,
        "type": mtype,
        "event": name,
        "anonymousId": ids["anonymousId"],
        "userId": ids["userId"],
        "previousId": ids["previousId"],
        "groupId": ids["groupId"],
        "timestamp": envelope.to_ms(ts),
        "receivedAt": envelope.to_ms(raw.received_at),
        "sentAt": envelope.to_ms(sent) if sent else None,
        "properties": objects["properties"],
        "traits": objects["traits"],
        "context": objects["context"],
        "source": raw.source,
    })
