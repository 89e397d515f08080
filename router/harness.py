"""Run a router inside this process on a background event loop (tests, benchmarks, the main job): the caller
stays synchronous and talks to it over HTTP like any client."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from .app import Router
from .config import RouterConfig


class RouterThread:
    def __init__(self, cfg: RouterConfig, policy_seed: int | None = None):
        self.cfg = cfg
        self.router = Router(cfg, policy_seed)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="router", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen_host}:{self.port}"

    def call(self, coro, timeout: float | None = 60):
        """Run a coroutine on the router's loop (e.g. to inspect or change its state) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "RouterThread":
        self.thread.start()

        async def up():
            self.runner = web.AppRunner(self.router.app())
            await self.runner.setup()
            site = web.TCPSite(self.runner, self.cfg.listen_host, self.cfg.listen_port or 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        self.call(up())
        return self

    def stop(self) -> None:
        if self.runner is not None:
            try:
                self.call(self.runner.cleanup(), timeout=30)
            except Exception:  # noqa: BLE001
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
