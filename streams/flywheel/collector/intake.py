"""The collector's decision for one request, as a pure function (no I/O, no clock, no Kafka).

    size → Content-Encoding → credentials → JSON → items → merge shared fields → encode + per-event limit

The first problem stops the request with a `Rejected` (nothing of it is written); otherwise the
`Accepted` records are what goes to events.raw, all stamped with the same receivedAt and source.
Semantic checks (ids, types, tracking plan, timestamps) are not done here: validate does them
downstream, so an accepted request's bad events reach the DLQ with reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from flywheel.collector.auth import WriteKeys, basic_username
from flywheel.collector.batch import complete, encode, split
from flywheel.collector.body import decode
from flywheel.collector.outcomes import Accepted, Reject, Rejected, bad_request
from flywheel.model.envelope import Limits

UNAUTHORIZED = (
    "missing or unknown write key: send it as the HTTP Basic username (empty password) "
    "or as 'writeKey' in the JSON body"
)


@dataclass(frozen=True, slots=True)
class Request:
    """What the decision needs of an HTTP request. `body` is as received (maybe gzip)."""

    kind: str  # the path after /v1/: batch, track, identify, alias, page, screen, group
    body: bytes
    authorization: str | None = None
    content_encoding: str | None = None
    remote: str | None = None


def intake(request: Request, keys: WriteKeys, limits: Limits, *, now_ms: int) -> Accepted | Rejected:
    try:
        return _intake(request, keys, limits, now_ms)
    except Reject as stop:
        return stop.rejected


def too_large(size: int | None, limits: Limits) -> Rejected:
    """The request body is over the limit (`size` None: the reader stopped before the end)."""
    got = f"{size} bytes" if size is not None else "larger"
    return Rejected(
        400, "request_too_large",
        f"request body is {got}, over the limit of {limits.max_request_bytes} bytes per request",
    )


def _intake(request: Request, keys: WriteKeys, limits: Limits, now_ms: int) -> Accepted:
    if len(request.body) > limits.max_request_bytes:
        raise Reject(too_large(len(request.body), limits))
    source = keys.label(basic_username(request.authorization))
    try:
        data = decode(request.body, request.content_encoding, max_bytes=limits.max_request_bytes)
        body = _json_object(data)
    except Reject:
        if source is None:  # no valid credentials: say nothing about the body
            raise Reject(Rejected(401, "unauthorized", UNAUTHORIZED)) from None
        raise
    if source is None:
        source = keys.label(body.get("writeKey"))
        if source is None:
            raise Reject(Rejected(401, "unauthorized", UNAUTHORIZED))
    items, shared = split(request.kind, body, ip=request.remote)
    records = encode([complete(item, shared) for item in items], max_event_bytes=limits.max_event_bytes)
    return Accepted(records, source, now_ms)


def _json_object(data: bytes) -> dict:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise bad_request("malformed_json", f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("malformed_json", f"expected a JSON object, got {type(body).__name__}")
    return body

