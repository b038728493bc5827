"""Validate stage: one raw Kafka record → `Valid(event)` or `Invalid(reasons)`. Pure; never raises.

Every record ends in exactly one of the two outcomes, so received = valid + invalid holds by
construction. The valid outcome is the normalised event (the documented value of
`events.identified`); the invalid one keeps the original bytes for the DLQ.

orjson decodes the bytes; two paths then check the message, sharing one set of rules:

- the fast path, `_fast`: one pydantic-core call (`validate_python`, strict) with a validator compiled once
  per plan (`_message_schema`): the envelope's types per message type and, for a track event, the tracking
  plan's rule (`EventRule.schema`). The rules about values rather than types (which ids a message type
  needs, placeholder ids, timestamps) are not restated as schemas: the fast path runs the reason path's
  own helpers for them. It returns Valid or nothing, never reasons.
- the reason path, `_checked`: the hand-written checks, which name every reason. They define what is valid
  and run for whatever the fast path did not take: invalid records (rare), and the few valid oddities the
  schema leaves out (a non-string `originalTimestamp` beside a `timestamp`, `properties: null` on a
  planned event).

The fast path takes a subset of what the reason path takes and builds the same event, so every outcome is
the reason path's. tests/unit/test_validate_equivalence.py holds them to that against the pre-pydantic
validate (tests/reference_validate.py) on arbitrary input.

Why not validate_json over the raw bytes: pydantic-core's JSON parser reads some documents unlike orjson. It
takes NaN, Infinity and 1e400, which orjson refuses; it keeps integers beyond 64 bits exact, which orjson
makes floats; and a typed dict never looks at the earlier of two duplicate keys. Reading every value as
orjson does takes a union over every value, and then validate_json costs about twice what orjson.loads and
validate_python do (bench/validate.py measures both).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic_core import PydanticCustomError, SchemaValidator, ValidationError, core_schema
from pydantic_core.core_schema import CoreSchema

from flywheel.model import envelope, identity
from flywheel.model.clock import to_ms
from flywheel.model.envelope import (
    HEADER_BACKFILL,
    HEADER_FORGET,
    HEADER_RECEIVED_AT,
    HEADER_REPLAY_OF,
    HEADER_SOURCE,
    HEADER_TICK,
    MESSAGE_TYPES,
    BadTimestamp,
    Limits,
)
from flywheel.model.plan import EventRule, TrackingPlan

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
    replay_of: str = ""  # a replayed DLQ record: the origin of the record first rejected
    forget: str = ""  # not an event but a forget request (flywheel persons forget): its id
    tick: int | None = None  # not an event but a progress marker (runtime/ticker.py): its time, epoch ms
    backfill: bytes = b""  # a stored event sent back for new conditions (stages/backfill.py): revision, pids

    @property
    def origin(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"

    @classmethod
    def from_record(cls, record, *, topic: str) -> Raw:
        """A record of events.raw (key, value, headers, timestamp in seconds, partition, offset): source and
        receivedAt from its headers, else the Kafka timestamp."""
        headers = dict(record.headers or ())
        source = headers.get(HEADER_SOURCE, b"kafka").decode("utf-8", "replace")
        stamped = headers.get(HEADER_RECEIVED_AT)
        try:
            received_ms = int(stamped) if stamped is not None else int(record.timestamp * 1000)
        except ValueError:
            received_ms = int(record.timestamp * 1000)
        value = record.value
        replay_of = headers.get(HEADER_REPLAY_OF)
        forget = headers.get(HEADER_FORGET)
        tick = headers.get(HEADER_TICK)
        backfill = headers.get(HEADER_BACKFILL)
        return cls(
            value=value if isinstance(value, bytes) else bytes(value or b""),
            source=source,
            received_at=datetime.fromtimestamp(received_ms / 1000, tz=UTC),
            topic=topic, partition=record.partition, offset=record.offset,
            replay_of=replay_of.decode("utf-8", "replace") if replay_of else "",
            forget=forget.decode("utf-8", "replace") if forget else "",
            tick=int(tick) if tick is not None and tick.isdigit() else None,
            backfill=bytes(backfill) if backfill else b"",
        )


@dataclass(frozen=True, slots=True)
class Valid:
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Invalid:
    reasons: list[str]
    raw: Raw

    def dlq_record(self) -> dict[str, Any]:
        """The documented value of events.invalid."""
        return dlq_record(self.raw.value, source=self.raw.source, reasons=self.reasons,
                          received_ms=to_ms(self.raw.received_at), origin=self.raw.origin,
                          replay_of=self.raw.replay_of)


def dlq_record(payload: bytes, *, source: str, reasons: list[str], received_ms: int, origin: str,
               replay_of: str = "") -> dict[str, Any]:
    """A record of events.invalid: the original bytes (base64 if they are not UTF-8), why, from where, and — a
    replay rejected again — the origin of the record first rejected."""
    try:
        text, encoding = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(payload).decode(), "base64"
    record = {"receivedAt": received_ms, "source": source, "reasons": reasons, "payload": text,
              "payloadEncoding": encoding, "origin": origin}
    if replay_of:
        record["replayOf"] = replay_of
    return record


DEFAULT_LIMITS = Limits()
_ID_FIELDS = ("userId", "anonymousId", "previousId", "groupId")
_OBJECT_FIELDS = ("properties", "traits", "context")


def validate(raw: Raw, plan: TrackingPlan, limits: Limits = DEFAULT_LIMITS) -> Valid | Invalid:
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
    # orjson reads JSON nested 1024 deep but writes only MAX_NESTING: a deeper event could never be
    # forwarded (and would fail its batch for good). Fewer brackets than that cannot nest that deep.
    if raw.value.count(b"{") + raw.value.count(b"[") > MAX_NESTING and not _writable(msg):
        return Invalid([f"nested deeper than {MAX_NESTING} levels: events travel as JSON, which cannot be "
                        "written that deep"], raw)
    return _fast(raw, msg, plan, limits) or _checked(raw, msg, plan, limits)


MAX_NESTING = 253  # orjson.dumps refuses deeper values


def _writable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- the reason path


def _checked(raw: Raw, msg: dict[str, Any], plan: TrackingPlan, limits: Limits) -> Valid | Invalid:
    reasons: list[str] = []
    mtype = msg.get("type")
    if mtype is None:
        reasons.append("missing 'type'")
    elif not isinstance(mtype, str) or mtype not in MESSAGE_TYPES:
        reasons.append(f"unknown type {str(mtype)[:40]!r} (expected one of {', '.join(sorted(MESSAGE_TYPES))})")

    ids = {}
    for field in _ID_FIELDS:
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
    reasons.extend(_id_reasons(mtype, ids))

    name = ""
    if mtype == "track":
        event = _track_name(msg.get("event"))
        if event is None:
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
    for field in _OBJECT_FIELDS:
        value = msg.get(field)
        if value is None:
            objects[field] = {}
        elif not isinstance(value, dict):
            reasons.append(f"'{field}' must be an object, got {type(value).__name__}")
            objects[field] = {}
        else:
            objects[field] = value
    objects["traits"] = _traits(mtype, objects["traits"], objects["context"])

    ts, sent, time_reasons = _clock(msg, raw, limits)
    reasons.extend(time_reasons)

    message_id = msg.get("messageId")
    if message_id is None or message_id == "":
        message_id = _derived_id(raw.value)
    elif envelope.as_id(message_id) is None:
        reasons.append(f"messageId must be a string, got {type(message_id).__name__}")
    else:
        message_id = envelope.as_id(message_id)

    if mtype == "track" and name:
        reasons.extend(plan.check_track(name, objects["properties"]))

    if reasons:
        return Invalid(reasons, raw)
    assert ts is not None
    return Valid(_event(raw, message_id, mtype, name, ids, objects, ts, sent))


# --------------------------------------------------------------------------- rules both paths run


def _id_reasons(mtype: Any, ids: Mapping[str, str | None]) -> list[str]:
    """The ids the message type needs, and ids that are no real ids (an id that is "" or None is absent)."""
    reasons = []
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
    return reasons


def _track_name(value: Any) -> str | None:
    """A track event's name, if it is a usable one: a string with more than whitespace in it."""
    return value if isinstance(value, str) and value.strip() else None


def _traits(mtype: Any, traits: dict | None, context: dict | None) -> dict | None:
    """identify/group carry traits at the top level in the spec; older SDKs put them in context."""
    if mtype in ("identify", "group") and not traits and context:
        ctx_traits = context.get("traits")
        if isinstance(ctx_traits, dict):
            return ctx_traits
    return traits


def _clock(msg: Mapping[str, Any], raw: Raw, limits: Limits) -> tuple[datetime | None, datetime | None, list[str]]:
    """(event time, sentAt, reasons): the times must parse, and the event time lie between 1970 and
    receivedAt plus the clock skew allowed."""
    reasons = []
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
    return ts, sent, reasons


def _derived_id(payload: bytes) -> str:
    """The messageId of a message without one. Segment assigns one server-side; ours is derived from the
    bytes so a byte-identical retry still deduplicates."""
    return "fw-" + hashlib.blake2b(payload, digest_size=16).hexdigest()


def _event(raw: Raw, message_id: str, mtype: str, name: str, ids: Mapping[str, str | None],
           objects: Mapping[str, dict | None], ts: datetime, sent: datetime | None) -> dict[str, Any]:
    """The normalised event (an absent id is "", an absent object {})."""
    return {
        "messageId": message_id,
        "type": mtype,
        "event": name,
        "anonymousId": ids["anonymousId"] or "",
        "userId": ids["userId"] or "",
        "previousId": ids["previousId"] or "",
        "groupId": ids["groupId"] or "",
        "timestamp": to_ms(ts),
        "receivedAt": to_ms(raw.received_at),
        "sentAt": to_ms(sent) if sent else None,
        "properties": objects["properties"] or {},
        "traits": objects["traits"] or {},
        "context": objects["context"] or {},
        "source": raw.source,
    }


# --------------------------------------------------------------------------- the fast path


def _fast(raw: Raw, decoded: dict[str, Any], plan: TrackingPlan, limits: Limits) -> Valid | None:
    """Valid, or None for "ask the reason path" (which may still find the record valid)."""
    try:
        msg = _validator(plan).validate_python(decoded, strict=True)
    except ValidationError:
        return None
    # What the reason path checks value by value holds now: ids and messageId are strings (numbers made
    # strings) or None, names and times strings or None, objects dicts or None; a track event is one the
    # plan allows and obeys its rule.
    mtype = msg["type"]
    name = _track_name(msg["event"]) if mtype == "track" else msg.get("name") or ""
    if name is None or _id_reasons(mtype, msg):
        return None
    ts, sent, time_reasons = _clock(msg, raw, limits)
    if time_reasons:
        return None
    assert ts is not None
    msg["traits"] = _traits(mtype, msg["traits"], msg["context"])
    return Valid(_event(raw, msg["messageId"] or _derived_id(raw.value), mtype, name, msg, msg, ts, sent))


# The plan's validator is built on first use (milliseconds) and kept by the plan's identity; the entry
# holds the plan, so its id stays its own. A process has one plan; tests make a few.
_VALIDATORS: dict[int, tuple[TrackingPlan, SchemaValidator]] = {}


def _validator(plan: TrackingPlan) -> SchemaValidator:
    hit = _VALIDATORS.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    if len(_VALIDATORS) >= 16:
        _VALIDATORS.clear()
    validator = SchemaValidator(_message_schema(plan))
    _VALIDATORS[id(plan)] = (plan, validator)
    return validator


def _optional(schema: CoreSchema, **kw: Any) -> core_schema.TypedDictField:
    return core_schema.typed_dict_field(core_schema.with_default_schema(schema, default=None), required=False, **kw)


_STR = core_schema.str_schema(strict=True)
# envelope.as_id: a string, or a number made a string (str(), as as_id does); never a bool.
_ID = core_schema.nullable_schema(core_schema.union_schema([
    _STR,
    core_schema.no_info_after_validator_function(str, core_schema.int_schema(strict=True)),
    core_schema.no_info_after_validator_function(str, core_schema.float_schema(strict=True)),
], mode="left_to_right"))
_TEXT = core_schema.nullable_schema(_STR)
_OBJECT = core_schema.nullable_schema(core_schema.is_instance_schema(dict))  # passed on as decoded, not copied
_ENVELOPE = {
    "type": core_schema.typed_dict_field(_STR),
    **{field: _optional(_ID) for field in (*_ID_FIELDS, "messageId")},
    # event_time reads originalTimestamp only without a timestamp: a non-string one beside a timestamp is
    # valid, and rare; it takes the reason path.
    **{field: _optional(_TEXT) for field in ("timestamp", "originalTimestamp", "sentAt")},
    **{field: _optional(_OBJECT) for field in _OBJECT_FIELDS},
}


def _message_schema(plan: TrackingPlan) -> CoreSchema:
    """A decoded message → its envelope's fields, or a ValidationError: a tagged union on `type`, and for
    track one on `event` over the plan's events (each with its rule), then, if the plan allows unknown
    events, any other name. Strict over decoded JSON values means exact types, as isinstance checks."""

    def track(event: EventRule | None) -> CoreSchema:
        fields = {**_ENVELOPE, "event": core_schema.typed_dict_field(
            _STR if event else core_schema.no_info_after_validator_function(_unlisted, _STR))}
        if event:  # `properties` read once more, against the plan's rule (the field above passes them on as
            # sent): absent counts as {} as on the reason path; null is not an object, so that takes the reason path
            fields["_plan"] = core_schema.typed_dict_field(
                core_schema.with_default_schema(event.schema, default={}, validate_default=True),
                required=False, validation_alias="properties")
        return core_schema.typed_dict_schema(fields, strict=True)

    def _unlisted(name: str) -> str:
        if name in plan.events:  # a listed event that failed its rule must not pass as an unlisted one
            raise PydanticCustomError("listed", "a listed event that failed its rule")
        return name

    tracks = []
    if plan.events:
        tracks.append(core_schema.tagged_union_schema(
            {name: track(event) for name, event in plan.events.items()}, discriminator="event"))
    if plan.allow_unknown_events:
        tracks.append(track(None))
    envelope_only = core_schema.typed_dict_schema(_ENVELOPE, strict=True)
    named = core_schema.typed_dict_schema({**_ENVELOPE, "name": _optional(_TEXT)}, strict=True)
    by_type = {"identify": envelope_only, "alias": envelope_only, "group": envelope_only,
               "page": named, "screen": named}
    if tracks:  # else every track event is refused: unknown ones by the policy, and there are no others
        by_type["track"] = core_schema.union_schema(tracks, mode="left_to_right")
    assert by_type.keys() <= MESSAGE_TYPES
    return core_schema.tagged_union_schema(by_type, discriminator="type")
