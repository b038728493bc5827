"""Request bodies: Content-Encoding decoded here, bounded, so a small gzip bomb cannot grow large.

The HTTP servers pass the body as received (aiohttp's own decompression is off for them), so the
same code decides for the worker's web server and `flywheel collector`, and a broken gzip stream
is an ordinary 400.
"""

from __future__ import annotations

import zlib

from flywheel.collector.outcomes import Reject, Rejected, bad_request

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode(body: bytes, content_encoding: str | None, *, max_bytes: int) -> bytes:
    """The body without its Content-Encoding (identity, gzip, deflate); at most `max_bytes` of it."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        data = body
    elif encoding in _WBITS:
        data = _inflate(body, _WBITS[encoding], encoding, max_bytes)
    else:
        raise Reject(Rejected(
            415, "unsupported_encoding", f"Content-Encoding {encoding[:40]!r} is not supported (use gzip)"
        ))
    if len(data) > max_bytes:
        raise too_large_after(encoding, max_bytes)
    return data


def _inflate(body: bytes, wbits: int, encoding: str, max_bytes: int) -> bytes:
    out = bytearray()
    rest = body
    try:
        while rest:  # gzip allows several members back to back
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(rest, max_bytes + 1 - len(out))
            if len(out) > max_bytes or inflater.unconsumed_tail:
                raise too_large_after(encoding, max_bytes)
            if not inflater.eof:
                raise bad_request("bad_encoding", f"{encoding} body is truncated")
            rest = inflater.unused_data
    except zlib.error as exc:
        raise bad_request("bad_encoding", f"cannot decode the {encoding} body: {exc}") from None
    if not out and not body:
        raise bad_request("bad_encoding", f"empty {encoding} body")
    return bytes(out)


def too_large_after(encoding: str, max_bytes: int) -> Reject:
    return bad_request(
        "request_too_large",
        f"request body is larger than the limit of {max_bytes} bytes per request"
        + (f" once {encoding}-decoded" if encoding not in ("", "identity") else ""),
    )
