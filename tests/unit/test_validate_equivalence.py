"""validate() through pydantic-core gives exactly the outcome the hand-written validate gave, on any input.

The oracle is tests/reference_validate.py, a frozen copy of validate as it was before pydantic: the same
outcome type, the same event (value by value, with types and key order: 1 ≠ 1.0 ≠ True), the same reasons
in the same order. Inputs: arbitrary bytes, JSON-like text, JSON documents with what JSON parsers read
differently (NaN, 1e400, integers beyond 64 bits, duplicate keys, lone surrogates, deep nesting), and
Segment messages near the valid ones for two plans (unknown events rejected / allowed). And the plan's
rules in both forms (hand-written, pydantic-core) on random rules and properties.
"""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from flywheel import paths
from flywheel.model import identity
from flywheel.model.envelope import MESSAGE_TYPES, Limits
from flywheel.model.plan import TYPE_CHECKS, EventRule, PropertyRule, compile_plan, load_plan
from flywheel.model.validate import Invalid, Raw, Valid, _fast, validate
from flywheel.sample import journeys
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic_core import SchemaValidator, ValidationError
from reference_validate import reference_validate, violations

RECEIVED = datetime(2026, 11, 21, 12, tzinfo=UTC)
LIMITS = Limits()

REJECTING = compile_plan({
    "unknown_events": "reject",
    "events": {
        "Order Completed": {"properties": {
            "order_id": {"type": "string", "required": True},
            "revenue": {"type": "number", "required": True, "nullable": True},
            "items": {"type": "integer", "required": True},
            "gift": "boolean",
            "meta": "object",
            "products": "array",
            "anything": "any",
            "note": {"type": "string", "nullable": True},
        }},
        "Strict": {"additional_properties": False, "properties": {
            "a": "string", "n": {"type": "number"}, "p": {"type": "any", "required": True}}},
        "Bare": None,
        " ": {"properties": {"x": {"type": "string", "required": True}}},  # a name validate never accepts
    },
})
SHIPPED = load_plan(paths.schemas_dir() / "tracking_plan.yaml")  # unknown events allowed
PLANS = {"rejecting": REJECTING, "shipped": SHIPPED}


def same_outcome(value: bytes, plan, limits: Limits = LIMITS) -> None:
    raw = Raw(value, "test", RECEIVED, "events.raw", 3, 7)
    new, old = validate(raw, plan, limits), reference_validate(raw, plan, limits)
    if isinstance(old, Valid) and isinstance(new, Invalid) and new.reasons[0].startswith("nested deeper than"):
        # the one intended change: the reference let an event through that orjson cannot write (forwarding
        # it would fail its batch forever)
        with pytest.raises(orjson.JSONEncodeError):
            orjson.dumps(old.event)
        return
    assert type(new) is type(old), (new, old)
    if isinstance(old, Valid):
        assert identical(new.event, old.event), (new.event, old.event)
    else:
        assert new.reasons == old.reasons
        assert new.raw == old.raw
        assert new.dlq_record() == old.dlq_record()


def identical(a: Any, b: Any) -> bool:
    """Equal, with the same types (1 ≠ 1.0 ≠ True, 0.0 ≠ -0.0) and key order; iterative, as events can nest
    deeper than Python's recursion limit (and than orjson.dumps' 255 levels)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict):
            if list(x) != list(y):
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif repr(x) != repr(y):
            return False
    return True


# --------------------------------------------------------------------------- JSON written by hand


class Tok(str):
    """Raw JSON text, written as is (NaN, 1e400, 18446744073709551616, …)."""


class Pairs(list):
    """An object written pair by pair: duplicate keys allowed."""


def write(value: Any, ascii_only: bool = True) -> str:
    if isinstance(value, Tok):
        return value
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{write(k, ascii_only)}:{write(v, ascii_only)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return write(Pairs(value.items()), ascii_only)
    if isinstance(value, list):
        return "[" + ",".join(write(v, ascii_only) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)  # any size: orjson makes those beyond 64 bits floats
    if isinstance(value, float):
        return json.dumps(value)  # nan/inf come out as NaN/Infinity, which orjson refuses
    return json.dumps(value, ensure_ascii=ascii_only)


def encode(value: Any, ascii_only: bool = True) -> bytes:
    # surrogatepass: a lone surrogate in a string becomes invalid UTF-8 when not \u-escaped
    return write(value, ascii_only).encode("utf-8", "surrogatepass")


odd_numbers = st.sampled_from([
    Tok("NaN"), Tok("-NaN"), Tok("Infinity"), Tok("-Infinity"), Tok("1e400"), Tok("-1e400"), Tok("1e-400"),
    Tok("18446744073709551615"), Tok("18446744073709551616"), Tok("-9223372036854775808"),
    Tok("-9223372036854775809"), Tok("123456789012345678901234567890"), Tok("1E2"), Tok("-0"), Tok("-0.0"),
    Tok("0.30000000000000004441"), Tok("1.7976931348623157e308"), Tok("1.7976931348623159e308"), Tok("5e-324"),
    Tok('"\\ud800"'), Tok('"\\udc00\\ud800"'), Tok('"\\ud83d\\ude00"'), Tok('"\\u0000"'), Tok("01"), Tok("1."),
])
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1.0, -0.0, 2.0, 1e20, 0.5])
           | st.text(max_size=12) | st.sampled_from(["1", "1.0", "true", "null", "NaN", ""]) | odd_numbers)
plain_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                 | st.text(max_size=6) | st.sampled_from([1.0, -0.0, 2.0, "1", ""]))
plain_json = st.recursive(plain_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                              max_size=3), max_leaves=8)
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=8), children, max_size=4)
                      | st.lists(st.tuples(st.sampled_from(["a", "b", "type", "x"]), children), max_size=4).map(Pairs)),
    max_leaves=16,
)


# --------------------------------------------------------------------------- Segment messages near valid ones


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


junk_ids = st.sampled_from(sorted(identity.JUNK_IDS)).flatmap(
    lambda j: st.sampled_from([j, j.upper(), f" {j} ", f"\t{j}"]))
real_ids = (st.sampled_from(["a-1", "user-7", "8f14e45f-ceea-467a-9575-2c8b0e5b1f3c", "x y", " a ", "1"])
            | st.integers(1, 2**64) | st.sampled_from([1.0, 1.5, 1e20, 2.0**70]) | st.text(min_size=2, max_size=6))
any_ids = (real_ids | junk_ids | st.sampled_from(["", "  ", 0, -1, 0.0, -0.0, True, False, None, [], {"id": "a"}])
           | st.integers() | odd_numbers)
good_times = st.datetimes(min_value=datetime(2026, 10, 1), max_value=datetime(2026, 11, 22, 11),
                          timezones=st.just(UTC)).map(iso)
any_times = (good_times
             | st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2030, 1, 1),
                            timezones=st.just(UTC)).map(iso)
             | st.sampled_from(["2026-11-21T11:00:00.123456+02:00", "2026-11-21T11:00:00", "2026-11-21",
                                " 2026-11-21T11:00:00Z ", "2026-11-22T12:00:01Z", "2026-11-21T11:00:00.1234567Z",
                                "1969-12-31T23:59:59Z", "1970-01-01T00:00:00Z", "2026-13-01T00:00:00Z",
                                "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "not a time", ""])
             | st.sampled_from([0, 1.5, True, None, [], {}]))
any_names = st.sampled_from(["Order Completed", "Strict", "Bare", " ", "Product Viewed", "Product Added",
                             "Signed Up", "Unplanned", "", "\t", "order completed"]) | st.integers() | st.none()

right_values = {
    "string": st.text(max_size=6),
    "number": st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False),
    "integer": st.integers(-(2**63), 2**64 - 1) | st.sampled_from([2.0, -0.0, 1e20, 2.0**70]),
    "boolean": st.booleans(),
    "object": st.dictionaries(st.text(max_size=4), scalars, max_size=3),
    "array": st.lists(scalars, max_size=3),
    "any": json_values,
}
# the same without odd tokens, for checks over decoded values (orjson makes plain str, list, dict)
plain_values = {typ: right_values[typ] for typ in right_values} | {
    "object": st.dictionaries(st.text(max_size=4), plain_scalars, max_size=3),
    "array": st.lists(plain_scalars, max_size=3),
    "any": plain_json,
}
# what each type is easily mistaken for (lax coercions, bool as int, …)
near_misses = {
    "string": st.sampled_from([1, 1.0, True, None, [], {}]),
    "number": st.sampled_from(["1", "1.5", "NaN", True, False, None, [], {}]),
    "integer": st.sampled_from([1.5, -0.5, 1e-300, 4503599627370495.5, "1", "1.0",
                                True, False, None]),
    "boolean": st.sampled_from([0, 1, 1.0, "true", "false", None]),
    "object": st.sampled_from([[], "{}", "x", 1, None, [["a", 1]]]),
    "array": st.sampled_from([{}, "[]", "x", 1, None, {"0": 1}]),
    "any": st.none(),
}
wrong_values = st.sampled_from(["1", "", 1, 1.0, 1.5, -0.0, True, False, [], {}, None]) | odd_numbers


@st.composite
def properties_for(draw, rule: EventRule | None) -> dict[str, Any]:
    """Properties for an event: each planned one mostly right, else wrong, null or missing; some extra."""
    props: dict[str, Any] = {}
    for prop in rule.properties if rule else ():
        how = draw(st.sampled_from(["right"] * 8 + ["near", "wrong", "null", "missing"]))
        if how == "right":
            props[prop.name] = draw(right_values[prop.type])
        elif how == "near":
            props[prop.name] = draw(near_misses[prop.type])
        elif how == "wrong":
            props[prop.name] = draw(wrong_values)
        elif how == "null":
            props[prop.name] = None
    if draw(st.integers(0, 3)) == 0:
        props[draw(st.sampled_from(["extra", "note", "a", "n", "order_id"]))] = draw(scalars)
    return props


# A field of a message, and what it may be instead of a right value.
WILD = {
    "type": st.sampled_from(sorted(MESSAGE_TYPES) + ["purchase", "", "Track", 1, True, None, ["track"]]),
    "userId": any_ids, "anonymousId": any_ids, "previousId": any_ids, "groupId": any_ids, "messageId": any_ids,
    "event": any_names,
    "name": st.sampled_from(["Home", "", None, 3, ["x"], True]),
    "properties": st.sampled_from([None, [1], "x", {}, 7, True]) | json_values,
    "traits": st.sampled_from([None, {}, "x", [1]]) | json_values,
    "context": st.sampled_from([None, {}, {"traits": {"plan": "pro"}}, {"traits": "x"}, {"traits": {}}, "x", [1]])
    | json_values,
    "timestamp": any_times, "originalTimestamp": any_times, "sentAt": any_times,
    "integrations": json_values,
}


@st.composite
def messages(draw, plan) -> dict[str, Any]:
    """A valid message of any type, then none, one or a few of its fields made wrong, odd or absent."""
    mtype = draw(st.sampled_from(["track"] * 4 + sorted(MESSAGE_TYPES)))
    msg: dict[str, Any] = {"type": mtype}
    if mtype == "alias":
        msg |= {"previousId": draw(real_ids), "userId": draw(real_ids)}
    else:
        for field in draw(st.sampled_from([("userId",), ("anonymousId",), ("userId", "anonymousId")])):
            msg[field] = draw(real_ids)
        if mtype == "group":
            msg["groupId"] = draw(real_ids)
    if draw(st.integers(0, 3)):
        msg["messageId"] = draw(real_ids)
    if mtype == "track":
        rules = sorted(plan.events.values(), key=lambda r: r.name)
        rule = draw(st.sampled_from(rules)) if rules and draw(st.integers(0, 4)) else None
        msg["event"] = rule.name if rule else draw(st.sampled_from(["Unplanned", "Order completed", "x"]))
        if rule or draw(st.booleans()):
            msg["properties"] = draw(properties_for(rule))
    elif mtype in ("page", "screen") and draw(st.booleans()):
        msg["name"] = draw(st.sampled_from(["Home", "", None]))
    for field in ("traits", "context"):
        if draw(st.integers(0, 2)) == 0:
            msg[field] = draw(st.sampled_from([{}, {"plan": "pro"}, {"traits": {"plan": "pro"}}, {"os": {"n": 1}}]))
    times = draw(st.sampled_from([(), ("timestamp",), ("originalTimestamp",), ("originalTimestamp", "sentAt"),
                                  ("timestamp", "sentAt"), ("timestamp", "originalTimestamp", "sentAt")]))
    for field in times:
        msg[field] = draw(good_times)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        field = draw(st.sampled_from(sorted(WILD)))
        if field in msg and draw(st.integers(0, 3)) == 0:
            del msg[field]
        else:
            msg[field] = draw(WILD[field])
    return msg


@st.composite
def written(draw, plan) -> bytes:
    """A message as bytes: sometimes with a key written twice, or in raw UTF-8."""
    msg = draw(messages(plan))
    pairs = Pairs(msg.items())
    if draw(st.integers(0, 5)) == 0:
        key = draw(st.sampled_from([k for k, _ in pairs]))
        pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(WILD.get(key, json_values))))
    return encode(pairs, ascii_only=draw(st.booleans()))


# --------------------------------------------------------------------------- the properties


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
@example(b"")
@example(b"\xff\xfe")
@example(b"\xef\xbb\xbf{}")
@example(b'{"type": "track"}')
def test_arbitrary_bytes(value):
    same_outcome(value, REJECTING)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='{}[]",:0123456789.eE+-truefalsnNIiy \\\tu', max_size=60))
def test_json_like_text(text):
    same_outcome(text.encode(), REJECTING)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_arbitrary_json(value, ascii_only):
    same_outcome(encode(value, ascii_only), REJECTING)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(PLANS)).flatmap(lambda name: st.tuples(st.just(PLANS[name]), written(PLANS[name]))))
def test_segment_messages(case):
    plan, value = case
    same_outcome(value, plan)


@settings(max_examples=100, deadline=None)
@given(messages(REJECTING), st.integers(10, 400))
def test_segment_messages_near_the_size_limit(msg, max_bytes):
    same_outcome(encode(msg), REJECTING, Limits(max_event_bytes=max_bytes))


def ok(**fields) -> dict[str, Any]:
    return {"type": "track", "event": "Bare", "anonymousId": "a", "messageId": "m", **fields}


@pytest.mark.parametrize("value", [
    encode(ok(properties={"n": Tok("NaN")})),
    encode(ok(properties={"n": Tok("1e400")})),
    encode(ok(properties={"n": Tok("18446744073709551616")})),
    encode(ok(properties={"n": Tok("-9223372036854775809")})),
    encode(Pairs([("type", Tok("NaN")), *ok().items()])),
    encode(Pairs([("timestamp", Tok("1e999")), *ok().items(), ("timestamp", "2026-11-21T11:00:00Z")])),
    encode(Pairs([*ok().items(), ("type", "identify")])),
    encode(Pairs([("context", {"a": 1}), *ok().items(), ("context", {"b": 2})])),
    encode(ok(properties=Pairs([("a", 1), ("b", 2), ("a", 3)]))),
    encode(ok(anonymousId=Tok('"\\ud800"'))),
    encode(ok(anonymousId="\ud800"), ascii_only=False),
    encode(ok(anonymousId=Tok("18446744073709551616"))),
    encode(ok(userId=Tok("1e400"))),
    encode(ok(userId=Tok("-0"))),
    encode(ok(messageId=Tok("1.0"))),
    *[encode(ok(properties={"deep": Tok("[" * depth + "]" * depth)})) for depth in (50, 300, 1020, 1030, 5000)],
])
def test_where_parsers_differ(value):
    for plan in PLANS.values():
        same_outcome(value, plan)


# --------------------------------------------------------------------------- the plan's two forms


@st.composite
def rules(draw) -> EventRule:
    props = tuple(
        PropertyRule(name=name, type=typ, check=TYPE_CHECKS[typ], required=draw(st.booleans()),
                     nullable=draw(st.booleans()))
        for name, typ in draw(st.dictionaries(st.sampled_from(list(string.ascii_lowercase[:6])),
                                              st.sampled_from(sorted(TYPE_CHECKS)), max_size=4)).items()
    )
    return EventRule(name="E", properties=props, known=frozenset(p.name for p in props),
                     additional_properties=draw(st.booleans()))


@settings(max_examples=400, deadline=None)
@given(rules(), st.data())
def test_a_compiled_rule_accepts_exactly_what_the_rule_allows(rule, data):
    props = {}
    for name in data.draw(st.lists(st.sampled_from(list(string.ascii_lowercase[:8])), max_size=6)):
        typ = next((p.type for p in rule.properties if p.name == name), "any")
        props[name] = data.draw(plain_values[typ] | near_misses[typ] | plain_json)
    try:
        SchemaValidator(rule.schema).validate_python(props, strict=True)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == (violations(rule, props) == [])
    assert rule.violations(props) == violations(rule, props)


def test_the_fast_path_takes_the_sample_stream():
    """The valid events of the sample stream need no hand-written check (else pydantic bought nothing)."""
    for n, message in enumerate(journeys(300, seed=11, days=2, start=datetime(2026, 11, 19, tzinfo=UTC))):
        value = orjson.dumps(message)
        raw = Raw(value, "test", RECEIVED, "events.raw", 0, n)
        assert _fast(raw, orjson.loads(value), SHIPPED, LIMITS) is not None, message
        same_outcome(value, SHIPPED)
