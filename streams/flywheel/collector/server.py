"""The HTTP side of the collector: Segment's /v1/* endpoints, on the worker's web server or standalone.

A request is read (at most the request limit), decided by the pure `intake()`, and its records are
handed to the group committer; the answer is 200 `{"success": true}` only once Kafka committed them.
Every outcome is counted in /metrics (flywheel_collector_*).
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import socket
import time

import faust
from aiohttp import web
from faust.web import View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flywheel import observability as obs
from flywheel.app import HEADER_RECEIVED_AT, HEADER_SOURCE
from flywheel.collector.auth import WriteKeys
from flywheel.collector.batch import KINDS
from flywheel.collector.committer import Committer, GroupCommitter, KafkaUnavailable, transactional_producer
from flywheel.collector.intake import Limits, Request, intake, too_large
from flywheel.collector.outcomes import Accepted, Rejected
from flywheel.config import Settings

log = logging.getLogger(__name__)

JSON = "application/json"
# Our intake decodes Content-Encoding itself (bounded, and a broken gzip stream is a clean 400): aiohttp
# must hand over the body as sent. For the worker's server: faust.App(web_application_options=…).
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

    def __init__(self, *, keys: WriteKeys, limits: Limits, committer: Committer, retry_after: int = 5):
        self.keys = keys
        self.limits = limits
        self.committer = committer
        self.retry_after = retry_after

    @classmethod
    def from_settings(cls, settings: Settings) -> Collector:
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
            limits=Limits(max_event_bytes=settings.max_event_bytes,
                          max_request_bytes=settings.collector_max_request_bytes),
            committer=committer,
            retry_after=settings.collector_retry_after_seconds,
        )

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
            self.keys, self.limits, now_ms=time.time_ns() // 1_000_000,
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

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def close(self) -> None:
        await self.committer.close()


def _headers(accepted: Accepted) -> list[tuple[str, bytes]]:
    received = str(accepted.received_ms).encode()
    return [(HEADER_SOURCE, accepted.source.encode()), (HEADER_RECEIVED_AT, received)]


def register_collector(app: faust.App, *, settings: Settings) -> Collector:
    """Serve /v1/* from the worker's web server (FLYWHEEL_HTTP_PORT), next to /health and /metrics."""
    collector = Collector.from_settings(settings)
    for kind in KINDS:
        app.page(f"/v1/{kind}", name=f"collector_{kind}")(_view(collector, kind))

    @app.on_before_shutdown.connect
    async def close_collector(app: faust.App, **kwargs) -> None:
        await collector.close()

    return collector


def _view(collector: Collector, kind: str) -> type[View]:
    class CollectorView(View):
        async def post(self, request):
            return await collector.handle(request, kind)

        async def options(self, request):
            return await collector.preflight(request)

    CollectorView.__name__ = CollectorView.__qualname__ = f"Collector_{kind}"
    return CollectorView


def standalone_app(collector: Collector) -> web.Application:
    """The collector alone, for scaling it apart from the workers: /v1/*, /health, /metrics."""
    webapp = web.Application(handler_args=AIOHTTP_HANDLER_ARGS)
    for kind in KINDS:
        webapp.router.add_post(f"/v1/{kind}", _handler(collector, kind))
        webapp.router.add_route("OPTIONS", f"/v1/{kind}", collector.preflight)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": "collector"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    async def close(_: web.Application) -> None:
        await collector.close()

    webapp.router.add_get("/health", health)
    webapp.router.add_get("/metrics", metrics)
    webapp.on_cleanup.append(close)
    return webapp


def _handler(collector: Collector, kind: str):
    async def handler(request: web.Request) -> web.Response:
        return await collector.handle(request, kind)

    return handler


def run_standalone(settings: Settings, *, host: str = "0.0.0.0", port: int | None = None) -> None:
    port = port or settings.http_port
    log.info("collector on %s:%d → %s at %s", host, port, settings.topics.raw, settings.kafka_bootstrap)
    webapp = standalone_app(Collector.from_settings(settings))
    # Every request allocates thousands of short-lived objects (parsed JSON), so the collector runs
    # the garbage collector often; moving the start-up objects (modules, classes) out of its view
    # keeps each full collection small.
    gc.freeze()
    web.run_app(webapp, host=host, port=port, access_log=None, print=None)
