"""validate(): every record ends Valid or Invalid-with-reasons; table-driven cases + property tests."""

from datetime import UTC, datetime

import orjson
import pytest
from flywheel.model.envelope import Limits
from flywheel.model.plan import compile_plan
from flywheel.model.validate import Invalid, Raw, Valid, validate
from hypothesis import given, settings
from hypothesis import strategies as st

PLAN = compile_plan({"events": {"Order Completed": {"properties": {"order_id": {"type": "string", "required": True}}}}})
RECEIVED = datetime(2026, 11, 21, 12, tzinfo=UTC)


def run(value, **kw) -> Valid | Invalid:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return validate(Raw(raw, "test", RECEIVED, "events.raw", 0, 1), PLAN, Limits(**kw))


def ok(**fields):
    return {"type": "track", "event": "Viewed", "anonymousId": "a", "messageId": "m1", **fields}


def test_a_valid_track_event_is_normalised():
    out = run(ok(userId="u", properties={"x": 1}, originalTimestamp="2026-11-21T11:00:00Z",
                 sentAt="2026-11-21T11:00:10Z", context={"ip": "1.2.3.4"}))
    assert isinstance(out, Valid)
    e = out.event
    assert (e["messageId"], e["type"], e["event"], e["anonymousId"], e["userId"]) == ("m1", "track", "Viewed", "a", "u")
    assert e["timestamp"] == int(datetime(2026, 11, 21, 11, 59, 50, tzinfo=UTC).timestamp() * 1000)
    assert e["receivedAt"] == int(RECEIVED.timestamp() * 1000)
    assert e["properties"] == {"x": 1} and e["context"] == {"ip": "1.2.3.4"} and e["source"] == "test"


@pytest.mark.parametrize(("value", "reason"), [
    (b'{"type": "track"', "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    ([1, 2], "expected a JSON object, got list"),
    ({"event": "x", "anonymousId": "a"}, "missing 'type'"),
    (ok(type="purchase"), "unknown type 'purchase'"),
    ({"type": "track", "event": "x"}, "neither 'userId' nor 'anonymousId' is set"),
    (ok(userId={"id": 1}), "userId must be a string, got dict"),
    ({"type": "alias", "userId": "u"}, "alias needs 'previousId'"),
    ({"type": "alias", "previousId": "a"}, "alias needs 'userId'"),
    ({"type": "group", "userId": "u"}, "group needs 'groupId'"),
    (ok(event=""), "track needs a non-empty string 'event'"),
    (ok(event=5), "track needs a non-empty string 'event'"),
    ({"type": "page", "anonymousId": "a", "name": 3}, "'name' must be a string, got int"),
    (ok(properties=[1]), "'properties' must be an object, got list"),
    (ok(context="x"), "'context' must be an object, got str"),
    (ok(timestamp="not a time"), "timestamp: unparseable timestamp"),
    (ok(sentAt=123), "sentAt: expected an ISO-8601 string"),
    (ok(timestamp="2026-11-25T12:00:00Z"), "after receivedAt"),
    (ok(timestamp="1969-12-31T00:00:00Z"), "before 1970"),
    (ok(messageId=["m"]), "messageId must be a string, got list"),
    (ok(userId="undefined"), "not a real id"),
    (ok(anonymousId="null"), "not a real id"),
    ({"type": "alias", "previousId": "0", "userId": "u"}, "not a real id"),
    (ok(anonymousId="  "), "not a real id"),
    (ok(event="Order Completed", properties={"order_id": 1}), "property 'order_id' must be string"),
    (ok(event="Order Completed"), "property 'order_id' is required"),
    (ok(event="Order Completed", properties={"order_id": None}), "property 'order_id' is required and may not be"),
    (ok(userId=True), "userId must be a string, got bool"),
    (b'{"type": "track", "event": "x", "anonymousId": "a", "properties": {"p": NaN}}', "malformed JSON"),
    (b'{"type": "track", "event": "x", "anonymousId": "a", "properties": {"p": 1e400}}', "malformed JSON"),
])
def test_invalid_records_carry_a_reason(value, reason):
    out = run(value)
    assert isinstance(out, Invalid)
    assert any(reason in r for r in out.reasons), out.reasons


def test_all_reasons_are_reported_at_once():
    out = run({"type": "track", "properties": 1, "timestamp": "x"})
    assert isinstance(out, Invalid) and len(out.reasons) == 4


def test_oversized_events_are_invalid_and_keep_their_bytes():
    value = orjson.dumps(ok(properties={"blob": "x" * 40_000}))
    out = run(value)
    assert isinstance(out, Invalid) and "over the 32768-byte limit" in out.reasons[0]
    assert out.dlq_record()["payload"].encode() == value


def test_dlq_record_keeps_non_utf8_bytes_as_base64():
    out = run(b"\xff\x00garbage")
    record = out.dlq_record()
    assert record["payloadEncoding"] == "base64"
    assert record["origin"] == "events.raw/0@1" and record["source"] == "test"


def test_a_missing_message_id_is_derived_from_the_bytes():
    first = run({"type": "track", "event": "x", "anonymousId": "a"})
    again = run({"type": "track", "event": "x", "anonymousId": "a"})
    other = run({"type": "track", "event": "y", "anonymousId": "a"})
    assert first.event["messageId"] == again.event["messageId"] != other.event["messageId"]


def test_numeric_ids_are_stringified():
    out = run({"type": "identify", "userId": 42, "messageId": 7})
    assert out.event["userId"] == "42" and out.event["messageId"] == "7"


def test_identify_traits_fall_back_to_context_traits():
    out = run({"type": "identify", "userId": "u", "context": {"traits": {"plan": "pro"}}})
    assert out.event["traits"] == {"plan": "pro"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
segment_keys = st.sampled_from(["type", "event", "name", "userId", "anonymousId", "previousId", "groupId",
                                "messageId", "timestamp", "sentAt", "originalTimestamp", "properties",
                                "traits", "context"])
messages = st.dictionaries(segment_keys, json_values | st.sampled_from(
    ["track", "identify", "alias", "page", "screen", "group", "2026-11-21T10:00:00Z", "Order Completed"]
), max_size=10)


def _check_outcome(out) -> None:
    assert isinstance(out, Valid | Invalid)
    if isinstance(out, Invalid):
        assert out.reasons and all(isinstance(r, str) and r for r in out.reasons)
        assert not any(r.startswith("internal validation error") for r in out.reasons), out.reasons
        orjson.dumps(out.dlq_record())
    else:
        orjson.dumps(out.event)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_arbitrary_json_never_crashes_validation(value):
    _check_outcome(run(orjson.dumps(value)))


@settings(max_examples=400, deadline=None)
@given(messages)
def test_segment_shaped_messages_end_valid_or_invalid_with_reasons(message):
    _check_outcome(run(message))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_validation(value):
    _check_outcome(run(value))


def test_an_event_nested_deeper_than_json_can_be_written_is_invalid():
    """orjson reads 1024 levels but writes 253: such an event could never be forwarded."""
    plan = compile_plan({})
    deep = b'{"type": "track", "event": "E", "userId": "u", "properties": {"x": ' + b"[" * 300 + b"]" * 300 + b"}}"
    outcome = validate(Raw(deep, "test", datetime(2026, 1, 1, tzinfo=UTC)), plan)
    assert isinstance(outcome, Invalid) and outcome.reasons[0].startswith("nested deeper than 253 levels")
    shallow = deep.replace(b"[" * 300, b"[" * 200).replace(b"]" * 300, b"]" * 200)
    assert isinstance(validate(Raw(shallow, "test", datetime(2026, 1, 1, tzinfo=UTC)), plan), Valid)
