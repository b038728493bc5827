"""Liveness and readiness, for load balancers and orchestrators (docs/design.md §7).

    GET /health/live    200 while the process answers (its event loop runs); /health is the same
    GET /health/ready   200 {"ready": true} — or 503 {"ready": false, "reasons": [...]} saying what is wrong

Readiness is a list of checks, each returning None (fine) or a reason. What is checked depends on the
listener: the public collector is ready when Kafka takes events (events wait there while ClickHouse is
down, so the collector stays in the load balancer); a worker's admin listener adds ClickHouse, table
recovery and consumer lag (runtime/status.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

Check = Callable[[], Awaitable[str | None]]


class KafkaProbe:
    """Whether the brokers answer a metadata request; asked at most every `every` seconds."""

    def __init__(self, bootstrap: str, *, every: float = 5.0, timeout: float = 3.0):
        self.bootstrap = bootstrap
        self.every = every
        self.timeout = timeout
        self._client = None
        self._checked = -float("inf")
        self._reason: str | None = "not checked yet"
        self._lock = asyncio.Lock()

    async def __call__(self) -> str | None:
        async with self._lock:
            if time.monotonic() - self._checked >= self.every:
                self._reason = await self._probe()
                self._checked = time.monotonic()
            return self._reason

    async def _probe(self) -> str | None:
        from aiokafka import AIOKafkaClient

        try:
            async with asyncio.timeout(self.timeout):
                if self._client is None:
                    self._client = AIOKafkaClient(bootstrap_servers=self.bootstrap,
                                                  request_timeout_ms=int(self.timeout * 1000))
                    await self._client.bootstrap()
                await self._client.fetch_all_metadata()
            return None
        except Exception as exc:  # any failure means: not reachable now
            await self.close()
            return f"kafka: no answer from {self.bootstrap}: {str(exc) or type(exc).__name__}"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # closing a broken client: nothing left to do
                pass


async def reasons(checks: Sequence[Check]) -> list[str]:
    found = await asyncio.gather(*(check() for check in checks))
    return [r for r in found if r]


def add_health(app: web.Application, *, role: str, checks: Sequence[Check]) -> None:
    """/health, /health/live and /health/ready on `app`."""

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": role})

    async def ready(request: web.Request) -> web.Response:
        wrong = await reasons(checks)
        return web.json_response({"ready": not wrong, "role": role, "reasons": wrong}, status=503 if wrong else 200)

    app.router.add_get("/health", live)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
