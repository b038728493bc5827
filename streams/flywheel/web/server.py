"""Serving an aiohttp application on one address: a worker runs two (public collector, admin)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger(__name__)


class Listener:
    def __init__(self, app: web.Application, *, host: str, port: int, name: str):
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"cannot listen on {self.host}:{self.port} for the {self.name}: {exc.strerror or exc}; "
                          "is another process using the port?") from exc
        self._runner = runner
        log.info("%s listening on %s:%d", self.name, self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def serve(listeners: list[Listener], *, ready: Callable[[], None] | None = None) -> None:
    """Run the listeners until SIGTERM/SIGINT (`flywheel collector`, `flywheel ui`, `flywheel store`);
    `ready()` once all of them listen."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for listener in listeners:
            await listener.start()
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        for listener in reversed(listeners):
            await listener.stop()
