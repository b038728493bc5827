"""REFERENCE ORACLE — a frozen copy of `flywheel.model.validate.validate` (and of the tracking plan's
`EventRule.violations`) as they were before validation went through pydantic-core.

Do not edit this to make a test pass: it is what "the same outcome as before" means. Used by
tests/unit/test_validate_equivalence.py (new validate == this, on arbitrary input) and bench/validate.py
(old vs new cost). It reads the plan's data (rule names, types, required, nullable, additional_properties)
but none of its checking code. The helpers it calls (envelope.as_id/event_time/parse_time,
identity.junk_id_reason, clock.to_ms) are the live ones, shared with validate: a change to one of them
changes both sides, which is the point (validate must follow them, not a copy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from flywheel.model import envelope, identity
from flywheel.model.clock import to_ms
from flywheel.model.envelope import MESSAGE_TYPES, BadTimestamp, Limits, json_type
from flywheel.model.plan import EventRule, TrackingPlan
from flywheel.model.validate import Invalid, Raw, Valid

_MIN_TIME = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
DEFAULT_LIMITS = Limits()


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_integer(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "number": _is_number,
    "integer": _is_integer,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


def violations(event: EventRule, props: Mapping[str, Any]) -> list[str]:
    reasons: list[str] = []
    for rule in event.properties:
        if rule.name not in props:
            if rule.required:
                reasons.append(f"property '{rule.name}' is required by the tracking plan for '{event.name}'")
            continue
        value = props[rule.name]
        if value is None:
            if not rule.nullable and rule.required:
                reasons.append(f"property '{rule.name}' is required and may not be null")
            continue
        if not TYPE_CHECKS[rule.type](value):
            reasons.append(f"property '{rule.name}' must be {rule.type}, got {json_type(value)} for '{event.name}'")
    if not event.additional_properties:
        extra = sorted(k for k in props if k not in event.known)
        if extra:
            reasons.append(f"properties not in the tracking plan for '{event.name}': {', '.join(extra)}")
    return reasons


def check_track(plan: TrackingPlan, event: str, props: Mapping[str, Any]) -> list[str]:
    rule = plan.events.get(event)
    if rule is None:
        return [] if plan.allow_unknown_events else [f"event '{event}' is not in the tracking plan"]
    return violations(rule, props)


def reference_validate(raw: Raw, plan: TrackingPlan, limits: Limits = DEFAULT_LIMITS) -> Valid | Invalid:
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
        reasons.extend(check_track(plan, name, objects["properties"]))

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
        "timestamp": to_ms(ts),
        "receivedAt": to_ms(raw.received_at),
        "sentAt": to_ms(sent) if sent else None,
        "properties": objects["properties"],
        "traits": objects["traits"],
        "context": objects["context"],
        "source": raw.source,
    })
