"""The collector's pure core: write keys, batch expansion and merging, limits, intake() outcomes."""

import base64
from datetime import UTC, datetime

import orjson
import pytest
from flywheel.collector.auth import WriteKeys, basic_username, source_label
from flywheel.collector.batch import KINDS, Shared, complete, encode
from flywheel.collector.intake import Request, intake
from flywheel.collector.outcomes import Accepted, Record, Reject, Rejected
from flywheel.model.envelope import Limits, event_time, kafka_key
from flywheel.model.validate import Raw, Valid, validate
from hypothesis import given, settings
from hypothesis import strategies as st

KEY = "wk-test"
KEYS = WriteKeys([KEY, "other-key"])
NOW = 1_790_000_000_000


def basic(username: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


AUTH = basic(KEY)
LIMITS = Limits()


def run(kind="batch", body=None, *, auth=AUTH, raw=None, remote="203.0.113.9", limits=LIMITS):
    data = raw if raw is not None else orjson.dumps(body)
    return intake(Request(kind, data, authorization=auth, remote=remote), KEYS, limits, now_ms=NOW)


def events(outcome) -> list:
    assert isinstance(outcome, Accepted), outcome
    return [orjson.loads(r.value) for r in outcome.records]


# --- write keys -------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "username"), [
    (basic("k"), "k"),
    (basic("k", "ignored"), "k"),
    ("basic " + base64.b64encode(b"k:").decode(), "k"),
    ("Basic " + base64.b64encode(b"k").decode(), "k"),  # no colon at all
    (basic(""), None),
    ("Bearer abc", None),
    ("Basic !!!notbase64", None),
    ("Basic " + base64.b64encode(b"\xff\xfe:").decode(), None),
    ("", None),
    (None, None),
    ("Basic", None),
])
def test_basic_username(header, username):
    assert basic_username(header) == username


def test_a_key_maps_to_a_stable_label_that_does_not_contain_it():
    assert KEYS.label(KEY) == source_label(KEY)
    assert KEY not in source_label(KEY) and source_label(KEY).startswith("writekey:")
    assert source_label(KEY) != source_label("other-key")
    for wrong in ("", "wk-tes", "wk-test ", None, 5, ["wk-test"], "\udcff"):
        assert KEYS.label(wrong) is None


# --- authentication in intake -----------------------------------------------------------------

def test_the_key_may_come_as_basic_username_or_as_writekey_in_the_body():
    body = {"batch": [{"type": "track", "event": "E", "anonymousId": "a"}]}
    by_header = run(body=body)
    by_body = run(body={**body, "writeKey": KEY}, auth=None)
    assert isinstance(by_header, Accepted) and isinstance(by_body, Accepted)
    assert by_header.source == by_body.source == source_label(KEY)
    assert "writeKey" not in by_body.records[0].value.decode()  # the secret goes no further


@pytest.mark.parametrize(("auth", "body"), [
    (None, {"batch": []}),
    (basic("nope"), {"batch": []}),
    (basic("nope"), {"batch": [], "writeKey": "nope"}),
    ("Bearer " + KEY, {"batch": []}),
    (None, {"batch": [], "writeKey": 12}),
])
def test_no_valid_key_is_401(auth, body):
    out = run(body=body, auth=auth)
    assert isinstance(out, Rejected) and (out.status, out.code) == (401, "unauthorized")
    assert "write key" in out.message and orjson.loads(out.body())["success"] is False


def test_without_valid_credentials_a_broken_body_is_401_not_a_parser_message():
    out = run(raw=b"{nope", auth=basic("wrong"))
    assert (out.status, out.code) == (401, "unauthorized")


def test_a_valid_header_wins_over_a_wrong_body_key():
    assert isinstance(run(body={"batch": [], "writeKey": "wrong"}), Accepted)


# --- body ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "message"), [
    (b"{nope", "malformed JSON: "),
    (b"", "malformed JSON: "),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'"x"', "expected a JSON object, got str"),
    (b'{"batch": {"type": "track"}}', "'batch' must be an array of events, got an object"),
    (b'{"batch": "x"}', "'batch' must be an array of events, got a string"),
    (b'{"events": []}', "'batch' must be an array of events, got missing"),
    (b'{"batch": [], "context": []}', "batch-level 'context' must be an object, got an array"),
    (b'{"batch": [], "integrations": 1}', "batch-level 'integrations' must be an object, got an integer"),
])
def test_a_body_that_is_not_a_request_is_400_with_the_reason(raw, message):
    out = run(raw=raw)
    assert isinstance(out, Rejected) and out.status == 400
    assert message in out.message


def test_malformed_json_names_the_parsers_message():
    out = run(raw=b'{"batch": [}')
    assert out.code == "malformed_json" and "line 1 column" in out.message


# --- limits -------------------------------------------------------------------------------------

def test_an_event_over_32kb_rejects_the_whole_request_naming_the_limit():
    small = {"type": "track", "event": "E", "anonymousId": "a"}
    big = {**small, "properties": {"blob": "x" * (32 * 1024)}}
    out = run(body={"batch": [small, big, small]})
    assert (out.status, out.code) == (400, "event_too_large")
    assert "event 1 is" in out.message and "32768 bytes per event" in out.message


def test_the_per_event_limit_counts_the_merged_batch_context():
    item = {"type": "track", "event": "E", "anonymousId": "a", "properties": {"p": "x" * 20_000}}
    out = run(body={"batch": [item], "context": {"big": "y" * 20_000}})
    assert out.code == "event_too_large"


def test_a_request_over_500kb_is_400_naming_the_limit():
    items = [{"type": "track", "event": "E", "anonymousId": "a", "properties": {"p": "x" * 20_000}}] * 30
    out = run(body={"batch": items})
    assert (out.status, out.code) == (400, "request_too_large")
    assert "512000 bytes per request" in out.message


def test_limits_are_settings():
    body = {"batch": [{"type": "track", "event": "E", "anonymousId": "a"}]}
    assert run(body=body, limits=Limits(max_event_bytes=10)).code == "event_too_large"
    assert run(body=body, limits=Limits(max_request_bytes=10)).code == "request_too_large"


# --- batch expansion and merging -----------------------------------------------------------------

def test_batch_context_and_integrations_merge_into_items_and_item_keys_win():
    body = {
        "batch": [
            {"type": "track", "event": "E", "anonymousId": "a",
             "context": {"locale": "fr-FR", "app": {"v": 2}}, "integrations": {"Mixpanel": False}},
            {"type": "identify", "userId": "u"},
        ],
        "context": {"locale": "en-US", "library": {"name": "sdk"}, "app": {"v": 1}},
        "integrations": {"All": True, "Mixpanel": True},
        "sentAt": "2026-11-21T12:00:00.000Z",
    }
    first, second = events(run(body=body))
    ip = "203.0.113.9"
    assert first["context"] == {"locale": "fr-FR", "library": {"name": "sdk"}, "app": {"v": 2}, "ip": ip}
    assert first["integrations"] == {"All": True, "Mixpanel": False}
    assert second["context"] == {"locale": "en-US", "library": {"name": "sdk"}, "app": {"v": 1}, "ip": ip}
    assert second["integrations"] == {"All": True, "Mixpanel": True}
    assert first["sentAt"] == second["sentAt"] == "2026-11-21T12:00:00.000Z"


def test_an_items_own_sent_at_and_ip_are_kept():
    body = {"batch": [{"type": "track", "event": "E", "anonymousId": "a", "sentAt": "2026-01-01T00:00:00Z",
                       "context": {"ip": "198.51.100.1"}}], "sentAt": "2026-11-21T12:00:00Z"}
    (event,) = events(run(body=body))
    assert event["sentAt"] == "2026-01-01T00:00:00Z" and event["context"]["ip"] == "198.51.100.1"


def test_without_a_remote_address_or_shared_fields_nothing_is_invented():
    item = {"type": "track", "event": "E", "anonymousId": "a"}
    assert complete(item, Shared()) == item


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "batch"])
def test_single_event_endpoints_take_the_type_from_the_path(kind):
    out = run(kind, {"type": "something-else", "userId": "u", "writeKey": "ignored", "event": "E"})
    (event,) = events(out)
    assert event["type"] == kind and "writeKey" not in event and event["context"]["ip"] == "203.0.113.9"


def test_an_unknown_single_event_path_is_rejected():
    assert run("purchase", {"userId": "u"}).code == "unknown_path"


def test_items_that_are_not_objects_go_on_untouched_for_the_dlq():
    out = run(body={"batch": [1, "x", None, [], {"type": "track", "event": "E", "anonymousId": "a"}]})
    values = [r.value for r in out.records]
    assert values[:4] == [b"1", b'"x"', b"null", b"[]"]
    assert [r.key for r in out.records] == [None, None, None, None, b"a"]


def test_an_item_context_of_the_wrong_type_is_left_for_validate_to_report():
    item = {"type": "track", "event": "E", "anonymousId": "a", "context": "x"}
    (event,) = events(run(body={"batch": [item]}))
    assert event["context"] == "x"


def test_an_empty_batch_is_accepted_with_nothing_to_write():
    out = run(body={"batch": []})
    assert isinstance(out, Accepted) and out.records == []


@pytest.mark.parametrize(("item", "key"), [
    ({"type": "track", "anonymousId": "a", "userId": "u"}, b"a"),
    ({"type": "alias", "previousId": "p", "userId": "u"}, b"p"),
    ({"type": "identify", "userId": 42}, b"42"),
    ({"type": "track"}, None),
])
def test_records_are_keyed_per_design(item, key):
    (record,) = encode([item], max_event_bytes=1000)
    assert record == Record(key, orjson.dumps(item))


def test_an_alias_with_an_anonymous_id_is_keyed_by_its_previous_id():
    """FAILS TODAY. analytics.js sends anonymousId with every call, alias included. docs/design.md §3 and
    envelope.kafka_key key an alias by its previousId, so the link of previousId is decided on that
    id's partition, in order with its other events. encode() keys it by the anonymousId instead:
    the link is then written to the identity table on another partition, so the id's later events
    do not see it (person at ingestion stays the anonymous id) and a later identify of that id to
    another user becomes a second first link instead of a conflict."""
    item = {"type": "alias", "anonymousId": "device-x", "previousId": "p", "userId": "u"}
    (record,) = encode([item], max_event_bytes=1000)
    assert record.key == kafka_key(item).encode() == b"p"


def test_every_record_of_a_request_has_the_same_received_at_and_source():
    out = run(body={"batch": [{"type": "track", "event": "E", "anonymousId": str(i)} for i in range(5)]})
    assert out.received_ms == NOW and out.source == source_label(KEY) and len(out.records) == 5


def test_batch_sent_at_lets_validate_correct_clock_skew():
    """analytics.js style: device clock 1 h fast; originalTimestamp per item, sentAt per batch."""
    body = {"batch": [{"type": "track", "event": "E", "anonymousId": "a",
                       "originalTimestamp": "2026-11-21T12:59:50Z"}],
            "sentAt": "2026-11-21T13:00:00Z"}
    out = run(body=body)
    received = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
    (event,) = events(out)
    assert event_time(event, received) == datetime(2026, 11, 21, 11, 59, 50, tzinfo=UTC)


def test_accepted_records_pass_validate_unchanged():
    from flywheel.model.plan import compile_plan

    body = {"batch": [{"type": "track", "event": "E", "anonymousId": "a", "messageId": "m1"}]}
    (record,) = run(body=body).records
    outcome = validate(Raw(record.value, "s", datetime.now(UTC)), compile_plan({"events": {}}))
    assert isinstance(outcome, Valid) and outcome.event["context"]["ip"] == "203.0.113.9"


# --- properties ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
fields = st.sampled_from(["type", "event", "anonymousId", "userId", "previousId", "context", "integrations",
                          "sentAt", "writeKey", "messageId", "properties", "batch"])
objects = st.dictionaries(fields | st.text(max_size=6), json_values, max_size=8)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from([*KINDS, "nope"]), body=objects | json_values,
       items=st.lists(objects | json_values, max_size=5), use_batch=st.booleans(),
       auth=st.sampled_from([basic(KEY), basic("x"), None, "Basic ???"]))
def test_intake_always_decides_and_accepted_records_are_what_was_sent(kind, body, items, use_batch, auth):
    if use_batch and isinstance(body, dict):
        body = {**body, "batch": items}
    try:
        out = run(kind, body, auth=auth)
    except Reject:  # pragma: no cover - intake must not leak its control flow
        raise AssertionError("Reject escaped intake()") from None
    assert isinstance(out, Accepted | Rejected)
    if isinstance(out, Rejected):
        assert out.status in (400, 401) and out.message and orjson.loads(out.body())["success"] is False
        return
    assert auth == basic(KEY) or (isinstance(body, dict) and body.get("writeKey") == KEY)
    for record in out.records:
        assert len(record.value) <= Limits().max_event_bytes
        event = orjson.loads(record.value)
        assert not isinstance(event, dict) or "writeKey" not in event


def test_an_event_nested_too_deeply_to_be_written_is_a_400_not_a_crash():
    deep = b'{"type": "track", "event": "E", "userId": "u", "properties": {"x": ' + b"[" * 300 + b"]" * 300 + b"}}"
    out = intake(Request("track", deep, authorization=AUTH), KEYS, Limits(), now_ms=0)
    assert isinstance(out, Rejected) and (out.status, out.code) == (400, "invalid_batch")
    assert "nested too deeply" in out.message
