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


# ---- a small synchronous client for the router's HTTP API (stdlib only) --------------------------------------
import json as _json  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402


class HTTPError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _request(url: str, body, token: str | None, method: str | None = None):
    data = None if body is None else (body if isinstance(body, bytes) else _json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return urllib.request.Request(url, data=data, headers=headers, method=method)


def _open(request: urllib.request.Request, timeout: float):
    """urlopen, with an HTTP error status raised as HTTPError carrying the router's 'error' message."""
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = _json.loads(text).get("error", text)
        except ValueError:
            pass
        raise HTTPError(e.code, text) from None


def call(url: str, body=None, token: str | None = None, method: str | None = None, timeout: float = 300) -> dict:
    """JSON request -> JSON answer; HTTPError carries the router's 'error' message."""
    with _open(_request(url, body, token, method), timeout) as r:
        return _json.loads(r.read() or b"{}")


def stream(url: str, body, token: str | None = None, timeout: float = 300, on_open=None):
    """Server-sent events of a streaming request: yields each event's JSON (``[DONE]`` ends it). ``on_open``
    gets the response headers (the router's X-Request-Id) before the first event."""
    with _open(_request(url, body, token), timeout) as r:
        if on_open is not None:
            on_open(r.headers)
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            event = _json.loads(payload)
            if "error" in event:
                raise HTTPError(200, event["error"])
            yield event
