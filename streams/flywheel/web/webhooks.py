"""Alert webhooks (docs/design.md §10): where a rule may post, and one signed POST.

Allowlist. A webhook URL must fall under one of FLYWHEEL_ALERT_WEBHOOKS's prefixes — same scheme, host and
port, and a path starting with the prefix's path. Rules name their URLs in a file today and in the UI
later; without the list, whoever edits a rule could make the worker call any address it can reach (SSRF).
A worker refuses to start with a rule whose URL is not allowed, or whose secret is not set.

The POST. Body: the transition record as JSON (README, "Alerts"), plus a Slack-compatible `text` if the
rule asks. Headers: `Idempotency-Key` (the same for every delivery of one transition: receivers dedupe on
it), and with a secret `X-Flywheel-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` —
the timestamp is signed with the body, so a receiver that rejects old timestamps cannot be fed a replay.
Anything but a 2xx, or no answer within the timeout, fails the delivery (and the alerts stage retries it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from flywheel.metrics.alerts import text
from flywheel.metrics.definitions import Alert, Notify

SIGNATURE = "X-Flywheel-Signature"
IDEMPOTENCY = "Idempotency-Key"
_PORTS = {"http": 80, "https": 443}


class WebhookError(RuntimeError):
    pass


def _parts(url: str) -> tuple[str, str, int, str]:
    u = urlsplit(url)
    if u.scheme not in _PORTS or not u.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    return u.scheme, u.hostname.lower(), u.port or _PORTS[u.scheme], u.path or "/"


def allowed(url: str, prefixes: Iterable[str]) -> bool:
    """Whether `url` falls under one of the prefixes (scheme, host and port equal; path under the prefix's)."""
    try:
        scheme, host, port, path = _parts(url)
    except ValueError:
        return False
    if "@" in urlsplit(url).netloc:
        return False  # user:password@ makes the host easy to misread
    for prefix in prefixes:
        try:
            p_scheme, p_host, p_port, p_path = _parts(prefix)
        except ValueError:
            continue
        if (scheme, host, port) == (p_scheme, p_host, p_port) and path.startswith(p_path):
            return True
    return False


def prefixes(setting: str) -> list[str]:
    return [p.strip() for p in setting.split(",") if p.strip()]


def problems(alerts: Iterable[Alert], setting: str, env: Mapping[str, str] = os.environ) -> list[str]:
    """What keeps these rules' webhooks from working, one line each (empty: nothing)."""
    allow = prefixes(setting)
    out = []
    for a in alerts:
        for n in a.notify:
            if not allowed(n.webhook, allow):
                out.append(f"alert {a.name}: webhook {n.webhook} is not allowed by FLYWHEEL_ALERT_WEBHOOKS "
                           f"({setting or 'empty'}): add its prefix there")
            if n.secret_env and not env.get(n.secret_env):
                out.append(f"alert {a.name}: the webhook secret's variable {n.secret_env} is not set")
    return out


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, now: float | None = None, tolerance: float = 300) -> bool:
    """A receiver's check (documented in the README; tests use it): the MAC, and a fresh timestamp."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    fresh = abs((time.time() if now is None else now) - timestamp) <= tolerance
    return fresh and hmac.compare_digest(signature(secret, timestamp, body), header)


class Webhooks:
    """Posts transitions (NotifyStage's `post`), through one aiohttp session."""

    def __init__(self, setting: str, *, timeout: float = 10.0, env: Mapping[str, str] = os.environ):
        self.allow = prefixes(setting)
        self.timeout = timeout
        self.env = env
        self._session = None

    def body(self, target: Notify, record: Mapping[str, Any]) -> bytes:
        out = dict(record)
        if target.slack:
            out["text"] = text(record)
        return orjson.dumps(out)

    async def post(self, target: Notify, record: Mapping[str, Any]) -> None:
        import aiohttp

        if not allowed(target.webhook, self.allow):  # checked at start too; the list may have changed
            raise WebhookError(f"webhook {target.webhook} is not allowed by FLYWHEEL_ALERT_WEBHOOKS")
        body = self.body(target, record)
        headers = {"Content-Type": "application/json", IDEMPOTENCY: record["idempotencyKey"]}
        if target.secret_env:
            secret = self.env.get(target.secret_env)
            if not secret:
                raise WebhookError(f"the webhook secret's variable {target.secret_env} is not set")
            headers[SIGNATURE] = signature(secret, int(time.time()), body)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(target.webhook, data=body, headers=headers, allow_redirects=False) as resp:
                if not 200 <= resp.status < 300:
                    raise WebhookError(f"webhook {target.webhook} answered {resp.status} for alert "
                                       f"{record['alert']} ({record['state']}): will try again")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WebhookError(f"webhook {target.webhook} unreachable for alert {record['alert']}: {exc!r}: "
                               "will try again") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
