"""Write keys: who may send, and the non-secret label an event keeps of the key it came with.

Segment SDKs send the write key as the HTTP Basic username with an empty password; some (and
analytics.js beacons) put `writeKey` in the JSON body instead. Either is accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable


def source_label(key: str) -> str:
    """What events.raw, ClickHouse and the metrics keep instead of the key itself (a secret).

    The first 12 hex digits of its SHA-256: stable, tells sources apart, and does not let a reader
    of the events table send events. `flywheel collector --help` / the README show how to compute it.
    """
    return "writekey:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class WriteKeys:
    """The accepted keys (FLYWHEEL_WRITE_KEYS), compared in constant time."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [(k.encode("utf-8"), source_label(k)) for k in keys if k]

    def label(self, candidate: object) -> str | None:
        """The source label of `candidate` if it is an accepted key, else None."""
        if not isinstance(candidate, str) or not candidate:
            return None
        given = candidate.encode("utf-8", "surrogatepass")
        found = None
        for key, label in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(given, key):
                found = label
        return found


def basic_username(authorization: str | None) -> str | None:
    """The username of an HTTP Basic `Authorization` header (the password is ignored, as Segment does)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    username, _, _password = decoded.partition(":")
    return username or None
