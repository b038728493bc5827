"""The HTTP side of the collector: Segment's /v1/* endpoints, on a worker's public listener or standalone.

A request is read (at most the request limit), decided by the pure `intake()`, and its records are
handed to the group committer; the answer is 200 `{"success": true}` only once Kafka committed them.
Every outcome is counted in /metrics (flywheel_collector_*).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import socket
from collections.abc import Mapping

import orjson
from aiohttp import web

from flywheel import observability as obs
from flywheel.collector.auth import WriteKeys, basic_username
from flywheel.collector.batch import KINDS
from flywheel.collector.committer import Committer, GroupCommitter, KafkaUnavailable, transactional_producer
from flywheel.collector.intake import UNAUTHORIZED, Request, intake, too_large
from flywheel.collector.outcomes import Accepted, Rejected
from flywheel.config import Settings
from flywheel.experiments import answer as assignment
from flywheel.metrics.definitions import Metrics
from flywheel.model.clock import wall_ms
from flywheel.model.envelope import HEADER_RECEIVED_AT, HEADER_SOURCE, Limits
from flywheel.registry import metrics_in_force
from flywheel.web.admin import admin_app
from flywheel.web.health import Check, KafkaProbe, add_health
from flywheel.web.server import Listener, serve

log = logging.getLogger(__name__)

JSON = "application/json"
# Our intake decodes Content-Encoding itself (bounded, and a broken gzip stream is a clean 400): aiohttp
# must hand over the body as sent.
AIOHTTP_HANDLER_ARGS = {"auto_decompress": False}
SUCCESS = b'{"success":true}'
# Browser SDKs post cross-origin; the write key, not the origin, is what authorises them.
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
    "Access-Control-Max-Age": "86400",
}


class Collector:
    """Segment HTTP Tracking API handler: one instance per process, shared by all paths."""

    def __init__(self, *, keys: WriteKeys, limits: Limits, committer: Committer, retry_after: int = 5,
                 experiments: Mapping[str, Mapping[str, float]] | None = None):
        self.keys = keys
        self.limits = limits
        self.committer = committer
        self.retry_after = retry_after
        self.experiments = experiments or {}  # name → {variation: weight}: POST /v1/assign

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Collector:
        """The collector for `settings`, assigning the experiments of `metrics` (default: the definitions in
        force, flywheel.registry)."""
        bootstrap = settings.kafka_bootstrap
        # Unique per process: two collectors sharing an id would fence each other's transactions.
        txn_id = f"{settings.app_id}-collector-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        timeout = settings.collector_timeout_seconds
        committer = GroupCommitter(
            topic=settings.topics.raw, timeout=timeout, lanes=settings.collector_transaction_lanes,
            producer_factory=lambda lane: transactional_producer(
                bootstrap, f"{txn_id}-{lane}", timeout=timeout
            ),
        )
        return cls(
            keys=WriteKeys(settings.write_key_set),
            limits=settings.limits(),
            committer=committer,
            retry_after=settings.collector_retry_after_seconds,
            experiments=variations(metrics if metrics is not None else metrics_in_force(settings)),
        )

    def use(self, metrics: Metrics) -> None:
        self.experiments = variations(metrics)

    async def handle(self, request: web.Request, kind: str) -> web.Response:
        status = 500
        try:
            response = await self._handle(request, kind)
            status = response.status
            return response
        finally:
            obs.COLLECTOR_REQUESTS.labels(kind, str(status)).inc()

    async def _handle(self, request: web.Request, kind: str) -> web.Response:
        body = await self._read_body(request)
        if body is None:
            return self._reject(too_large(request.content_length, self.limits))
        headers = request.headers
        outcome = intake(
            Request(kind, body, authorization=headers.get("Authorization"),
                    content_encoding=headers.get("Content-Encoding"), remote=request.remote),
            self.keys, self.limits, now_ms=wall_ms(),
        )
        if isinstance(outcome, Rejected):
            return self._reject(outcome)
        try:
            await self.committer.submit(outcome.records, _headers(outcome))
        except KafkaUnavailable as exc:
            rejected = Rejected(503, "kafka_unavailable", f"events not stored, retry later: {exc}")
            return self._reject(rejected, {"Retry-After": str(self.retry_after)})
        obs.COLLECTOR_EVENTS.labels(outcome.source).inc(len(outcome.records))
        return web.Response(body=SUCCESS, content_type=JSON, headers=CORS)

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body as sent (decoded by intake), or None past the request limit: never reads much further.

        The servers run with aiohttp's auto_decompress off (AIOHTTP_HANDLER_ARGS), so a compressed body
        counts against the limit once as sent and once decoded, and a broken one is a plain 400.
        """
        limit = self.limits.max_request_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            return None
        buf = bytearray()
        async for chunk in request.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                return None
        return bytes(buf)

    def _reject(self, rejected: Rejected, headers: dict[str, str] | None = None) -> web.Response:
        obs.COLLECTOR_REJECTS.labels(rejected.code).inc()
        headers = {**CORS, **(headers or {})}
        return web.Response(status=rejected.status, body=rejected.body(), content_type=JSON, headers=headers)

    async def assign(self, request: web.Request) -> web.Response:
        """POST /v1/assign: a user's variation in an experiment of the metrics file (flywheel.experiments.answer),
        for backend services without a flag service. Write-key auth as /v1/*; nothing is emitted."""
        body = await self._read_body(request)
        if body is None:
            return self._reject(too_large(request.content_length, self.limits))
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            data = exc
        source = self.keys.label(basic_username(request.headers.get("Authorization")))
        if source is None and isinstance(data, dict):
            source = self.keys.label(data.get("writeKey"))
        if source is None:
            return self._reject(Rejected(401, "unauthorized", UNAUTHORIZED))
        status, answer = assignment(data if not isinstance(data, Exception) else None, self.experiments)
        obs.COLLECTOR_REQUESTS.labels("assign", str(status)).inc()
        return web.Response(status=status, body=orjson.dumps(answer), content_type=JSON, headers=CORS)

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def close(self) -> None:
        await self.committer.close()


def _headers(accepted: Accepted) -> list[tuple[str, bytes]]:
    received = str(accepted.received_ms).encode()
    return [(HEADER_SOURCE, accepted.source.encode()), (HEADER_RECEIVED_AT, received)]


def collector_app(collector: Collector, *, kafka: Check) -> web.Application:
    """The public listener: /v1/* and /health (live; ready: Kafka takes events — for load balancers). Served
    by a worker (FLYWHEEL_HTTP_HOST:FLYWHEEL_HTTP_PORT) or by `flywheel collector`; /metrics is on the admin
    listener."""
    webapp = web.Application(handler_args=AIOHTTP_HANDLER_ARGS)
    for kind in KINDS:
        webapp.router.add_post(f"/v1/{kind}", _handler(collector, kind))
        webapp.router.add_route("OPTIONS", f"/v1/{kind}", collector.preflight)
    webapp.router.add_post("/v1/assign", collector.assign)
    webapp.router.add_route("OPTIONS", "/v1/assign", collector.preflight)
    add_health(webapp, role="collector", checks=[kafka])

    async def close(_: web.Application) -> None:
        await collector.close()

    webapp.on_cleanup.append(close)
    return webapp


def _handler(collector: Collector, kind: str):
    async def handler(request: web.Request) -> web.Response:
        return await collector.handle(request, kind)

    return handler


def run_standalone(settings: Settings, *, host: str, port: int) -> None:
    """`flywheel collector`: the public listener and the admin one (/health, /metrics) until SIGTERM/SIGINT."""
    log.info("collector on %s:%d → %s at %s", host, port, settings.topics.raw, settings.kafka_bootstrap)
    # Every request allocates thousands of short-lived objects (parsed JSON), so the collector runs
    # the garbage collector often; moving the start-up objects (modules, classes) out of its view
    # keeps each full collection small.
    gc.freeze()
    from flywheel.registry import in_force
    from flywheel.runtime.definitions import follow_in

    kafka = KafkaProbe(settings.kafka_bootstrap)
    definitions = in_force(settings, fallback=True)
    collector = Collector.from_settings(settings, definitions.metrics)
    app = collector_app(collector, kafka=kafka)

    async def follow(metrics: Metrics, stored) -> None:  # experiments added or changed: assigned at once
        collector.use(metrics)

    follow_in(app, settings, definitions.stored, follow)
    asyncio.run(serve([
        Listener(app, host=host, port=port, name="collector"),
        Listener(admin_app(role="collector", checks=[kafka]), host=settings.admin_host, port=settings.admin_port,
                 name="admin"),
    ]))


def variations(metrics: Metrics) -> dict[str, dict[str, float]]:
    return {e.name: dict(e.variations) for e in metrics.experiments}
