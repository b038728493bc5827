"""Content-Encoding decoding: gzip / deflate / identity, bounded, every failure a named 400/415."""

import gzip
import zlib

import pytest
from flywheel.collector.body import decode
from flywheel.collector.outcomes import Reject
from hypothesis import given, settings
from hypothesis import strategies as st

DATA = b'{"batch": []}'


@pytest.mark.parametrize(("encoding", "body"), [
    (None, DATA),
    ("", DATA),
    ("identity", DATA),
    ("gzip", gzip.compress(DATA)),
    ("GZIP ", gzip.compress(DATA)),
    ("x-gzip", gzip.compress(DATA)),
    ("deflate", zlib.compress(DATA)),
    ("gzip", gzip.compress(DATA[:5]) + gzip.compress(DATA[5:])),  # two members back to back
])
def test_supported_encodings_decode(encoding, body):
    assert decode(body, encoding, max_bytes=1000) == DATA


def rejected(body, encoding, max_bytes=1000):
    with pytest.raises(Reject) as info:
        decode(body, encoding, max_bytes=max_bytes)
    return info.value.rejected


@pytest.mark.parametrize(("encoding", "body", "code", "message"), [
    ("gzip", b"not gzip", "bad_encoding", "cannot decode the gzip body"),
    ("gzip", gzip.compress(DATA)[:-6], "bad_encoding", "gzip body is truncated"),
    ("gzip", b"", "bad_encoding", "empty gzip body"),
    ("deflate", b"\x00\x01", "bad_encoding", "cannot decode the deflate body"),
    ("gzip", gzip.compress(DATA) + b"junk", "bad_encoding", "cannot decode the gzip body"),
])
def test_broken_bodies_are_400(encoding, body, code, message):
    out = rejected(body, encoding)
    assert (out.status, out.code) == (400, code) and message in out.message


def test_unknown_encodings_are_415():
    out = rejected(DATA, "br")
    assert (out.status, out.code) == (415, "unsupported_encoding") and "'br'" in out.message


def test_a_gzip_bomb_stops_at_the_limit():
    bomb = gzip.compress(b"0" * 50_000_000)  # ~50 KB that would inflate to 50 MB
    assert len(bomb) < 100_000
    out = rejected(bomb, "gzip", max_bytes=512_000)
    assert (out.status, out.code) == (400, "request_too_large") and "512000 bytes" in out.message
    assert "gzip-decoded" in out.message


def test_the_limit_is_exact():
    assert decode(gzip.compress(b"x" * 100), "gzip", max_bytes=100) == b"x" * 100
    assert rejected(gzip.compress(b"x" * 101), "gzip", max_bytes=100).code == "request_too_large"
    assert rejected(b"x" * 101, None, max_bytes=100).code == "request_too_large"


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), max_bytes=st.integers(1, 400),
       encoding=st.sampled_from([None, "gzip", "deflate", "x-gzip", "br", "zz"]))
def test_decode_returns_bounded_bytes_or_a_rejection(body, encoding, max_bytes):
    try:
        out = decode(body, encoding, max_bytes=max_bytes)
    except Reject as stop:
        assert stop.rejected.status in (400, 415)
    else:
        assert isinstance(out, bytes) and len(out) <= max_bytes


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=2000))
def test_gzip_round_trips(data):
    assert decode(gzip.compress(data), "gzip", max_bytes=2000) == data
