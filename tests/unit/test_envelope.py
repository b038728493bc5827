from datetime import UTC, datetime, timedelta

import pytest
from flywheel.model.clock import to_ms
from flywheel.model.envelope import BadTimestamp, event_time, kafka_key

RECEIVED = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("message", "key"), [
    ({"type": "track", "anonymousId": "a", "userId": "u"}, "a"),
    ({"type": "track", "userId": "u"}, "u"),
    ({"type": "alias", "previousId": "a", "userId": "u"}, "a"),
    ({"type": "alias", "anonymousId": "x", "previousId": "a", "userId": "u"}, "a"),
    ({"type": "identify", "userId": 42}, "42"),
    ({"type": "track"}, None),
    ({"type": "track", "anonymousId": "", "userId": "u"}, "u"),
    ({"type": "track", "previousId": "p"}, None),  # previousId only counts for alias
])
def test_kafka_key_follows_anonymous_then_previous_then_user(message, key):
    assert kafka_key(message) == key


def test_explicit_timestamp_is_taken_as_sent():
    msg = {"timestamp": "2026-01-01T00:00:00Z", "sentAt": "2026-11-21T11:00:00Z",
           "originalTimestamp": "2026-11-21T10:00:00Z"}
    assert event_time(msg, RECEIVED) == datetime(2026, 1, 1, tzinfo=UTC)


def test_device_clock_skew_is_corrected_like_segment():
    # The device clock is 1 h behind: it sent at 11:00 (its time), we received at 12:00.
    msg = {"originalTimestamp": "2026-11-21T10:59:30.250Z", "sentAt": "2026-11-21T11:00:00Z"}
    assert event_time(msg, RECEIVED) == RECEIVED - timedelta(seconds=29.75)


def test_without_timestamps_the_event_time_is_received_at():
    assert event_time({}, RECEIVED) == RECEIVED


def test_naive_timestamps_are_utc_and_offsets_are_converted():
    assert event_time({"timestamp": "2026-11-21T10:00:00"}, RECEIVED) == datetime(2026, 11, 21, 10, tzinfo=UTC)
    assert event_time({"timestamp": "2026-11-21T12:00:00+02:00"}, RECEIVED) == datetime(2026, 11, 21, 10, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T00:00:00Z", 12345, ["2026-01-01"]])
def test_unparseable_timestamps_are_named(bad):
    with pytest.raises(BadTimestamp, match="timestamp"):
        event_time({"timestamp": bad}, RECEIVED)


def test_to_ms_is_exact():
    assert to_ms(datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)) == 1_700_000_000_123
    assert to_ms(datetime(2023, 11, 14, 22, 13, 20, 123999, tzinfo=UTC)) == 1_700_000_000_123
