"""What the router knows about each host: health, which models are loaded (its own bookkeeping, reconciled with
Triton's statistics endpoint), running sequences (Triton metrics), where each checkpoint sits (the loader's
status; no loader means every checkpoint is on local disk), load bandwidths measured from observed loads, and the
warm workers of each host's engine pool for the host's device (the pool's status)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .config import HostConfig
from .upstream import agrpc  # tritonclient, with its JSON dependency seen to

log = logging.getLogger("tritonmoe.router")

TIERS = ("gpu", "dram", "disk", "remote")
# Priors until a host has been seen loading (bytes/s, plus a fixed start-up cost per load: process start,
# imports, model build). Replaced by measurements (EWMA) as loads complete.
DEFAULT_BANDWIDTH = {"dram": 8e9, "disk": 1e9, "remote": 1e8}
DEFAULT_OVERHEAD_S = 5.0
# Recomputing a migrated stream's KV cache on the destination (ServerlessLLM: a * tokens + b): prefill of prompt +
# generated tokens plus a fixed cost (request set-up, first step). Learned per destination from migrations.
DEFAULT_RECOMPUTE_OVERHEAD_S = 0.2
DEFAULT_RECOMPUTE_S_PER_TOKEN = 2e-4
EWMA = 0.5
# A cold start through an engine pool whose device has no warm worker waits for one to warm up: the pool's workers
# report their warm-up phases; until one has, this prior (the H200's workers took ~11 s, the CPU VM's 3-6 s).
DEFAULT_POOL_WARMUP_S = 10.0
POOL_STATUS_TIMEOUT_S = 1.0  # a pool that does not answer its status within this is unknown: no warm worker
_METRIC_RE = re.compile(r'^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+|nan|inf)$')


@dataclass
class Instance:
    """One model on one host, as the router sees it."""
    model: str
    host: "Host"
    state: str = "loading"  # loading | ready | unloading | dead
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = 0.0
    probed: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None
    draining: bool = False  # its streams are being migrated away to free the host: no new requests
    started: float = field(default_factory=time.monotonic)  # when the router began loading it (or adopted it)
    est_load_s: float | None = None  # the start-up estimated when its load began (loading instances' time left)
    pool_wait_s: float = 0.0  # of which: the predicted wait for a warm engine-pool worker (0: one was free)


class PoolView:
    """What the router last heard from one engine pool (``pool_status``; shared by the hosts that name the same
    socket): warm workers per device, the workers claimed per device and model, the ages of the workers still
    warming up, and the warm-up time its workers reported. ``warm`` is None while the pool is unknown (not asked
    yet, or it did not answer): placement then counts no warm worker there."""

    def __init__(self, socket: str):
        self.socket = socket
        self.warm: dict[str, int] | None = None
        self.claimed: dict[str, dict[str, int]] = {}     # device -> model -> claimed workers
        self.starting: dict[str, list[float]] = {}        # device -> ages (s) of workers warming up, at answered_at
        self.warmup_s: dict[str, float] = {}              # device -> median warm-up its workers reported
        self.per_device = 1
        self.asked_at = 0.0                               # monotonic time the last answered query was sent
        self.answered_at = 0.0                            # ...and answered
        self.error: str | None = None                     # why the last query got no answer
        self.querying = False                             # a query is out (a hung pool holds one thread, no more)

    def update(self, status: dict, asked_at: float | None = None) -> None:
        devices = list(status.get("devices") or status.get("warm", {}))
        self.warm = {d: int(n) for d, n in (status.get("warm") or {}).items()}
        claimed: dict[str, dict[str, int]] = {d: {} for d in devices}
        starting: dict[str, list[float]] = {d: [] for d in devices}
        warmups: dict[str, list[float]] = {d: [] for d in devices}
        for w in status.get("workers") or []:
            d = w.get("device")
            if w.get("state") == "claimed":
                per_model = claimed.setdefault(d, {})
                per_model[w.get("model")] = per_model.get(w.get("model"), 0) + 1
            elif w.get("state") == "starting":
                starting.setdefault(d, []).append(float(w.get("age_s") or 0.0))
            phases = (w.get("warm") or {}).get("phases")
            if phases:
                warmups.setdefault(d, []).append(sum(float(v) for v in phases.values()))
        self.claimed, self.starting = claimed, starting
        for d, ws in warmups.items():
            if ws:
                self.warmup_s[d] = sorted(ws)[len(ws) // 2]
        self.per_device = max(1, int(status.get("per_device") or 1))
        self.answered_at = time.monotonic()
        self.asked_at = self.answered_at if asked_at is None else asked_at
        self.error = None

    def unknown(self, error: str) -> None:
        self.warm, self.error = None, error

    def warm_on(self, device: str) -> int:
        """Warm workers the pool last reported for ``device`` (0 when the pool is unknown)."""
        return (self.warm or {}).get(device, 0)

    def warmup_on(self, device: str) -> float:
        return self.warmup_s.get(device, DEFAULT_POOL_WARMUP_S)

    def wait_s(self, device: str, ahead: int, now: float | None = None) -> float:
        """How long a claim waits for a worker on ``device`` when ``ahead`` claims are already waiting there
        with no warm worker for them: the remaining warm-up of the worker it gets (the ones warming up now, in
        order of readiness; then one warm-up per round of ``per_device`` replacements)."""
        warmup = self.warmup_on(device)
        if self.warm is None:
            return warmup
        elapsed = (time.monotonic() if now is None else now) - self.answered_at
        # a worker past its expected warm-up is near the end, not done (it may also be failing)
        left = sorted(max(0.1 * warmup, warmup - age - elapsed) for age in self.starting.get(device, []))
        if ahead < len(left):
            return left[ahead]
        return warmup * (1 + (ahead - len(left)) // self.per_device)

    def snapshot(self, device: str) -> dict:
        return {"socket": self.socket, "device": device, "reachable": self.warm is not None,
                "warm": None if self.warm is None else self.warm_on(device),
                "starting": len(self.starting.get(device, [])) if self.warm is not None else None,
                "claimed": sum(self.claimed.get(device, {}).values()) if self.warm is not None else None,
                "warmup_s": round(self.warmup_on(device), 3), "error": self.error}


def attach_pools(hosts: list["Host"]) -> dict[str, PoolView]:
    """One :class:`PoolView` per engine-pool socket, shared by the hosts that name it (servers of one machine
    share its pool, and its warm count per device)."""
    views: dict[str, PoolView] = {}
    for h in hosts:
        if h.pool is not None:
            views.setdefault(h.pool.socket, h.pool)
    for h in hosts:
        if h.cfg.engine_pool and h.pool is None:
            h.pool = views.setdefault(h.cfg.engine_pool, PoolView(h.cfg.engine_pool))
    return views


class Host:
    def __init__(self, cfg: HostConfig):
        self.cfg = cfg
        self.name = cfg.name
        self._client: agrpc.InferenceServerClient | None = None
        self.healthy = True
        self.failures = 0
        self.instances: dict[str, Instance] = {}
        self.server_models: set[str] = set()   # READY models per Triton's statistics
        self.running: dict[str, float] = {}     # tritonmoe_running_sequences per model
        self.loader_ok: bool | None = None if cfg.loader else False
        self.loader_tiers: dict[str, tuple[str, int | None]] = {}
        self.bandwidth = {**DEFAULT_BANDWIDTH, **cfg.bandwidth}
        self.overhead_s = DEFAULT_OVERHEAD_S
        self.loads_in_flight = 0
        self.loads_observed = 0
        self.recompute_overhead_s = DEFAULT_RECOMPUTE_OVERHEAD_S
        self.recompute_s_per_token = DEFAULT_RECOMPUTE_S_PER_TOKEN
        self.recomputes_observed = 0
        self.adopted = False  # models already loaded on the server were looked at (first successful poll)
        self.pool: PoolView | None = None  # the engine pool of cfg.engine_pool (attach_pools), if any
        self.pool_device = cfg.pool_device
        self.waited_loads_observed = 0  # pooled loads predicted to wait for a worker (kept out of overhead_s)

    @property
    def client(self) -> agrpc.InferenceServerClient:
        # created on first use: a gRPC aio channel belongs to the event loop that is running when it is made
        if self._client is None:
            self._client = agrpc.InferenceServerClient(self.cfg.grpc)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def __repr__(self) -> str:
        return f"Host({self.name})"

    @property
    def inflight(self) -> int:
        return sum(i.inflight for i in self.instances.values())

    def ready_instance(self, model: str) -> Instance | None:
        inst = self.instances.get(model)
        return inst if inst is not None and inst.state == "ready" else None

    def resident(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state in ("loading", "ready")]

    def tier_of(self, model: str, use_loader: bool) -> str:
        if self.ready_instance(model):
            return "gpu"
        if use_loader and self.loader_ok and model in self.loader_tiers:
            tier = self.loader_tiers[model][0]
            return "dram" if tier == "dram" else ("remote" if tier == "remote" else "disk")
        return "disk"  # no loader (or it is down): the server reads the checkpoint from its local disk

    def estimate_load_s(self, tier: str, nbytes: int) -> float:
        if tier == "gpu":
            return 0.0
        return self.overhead_s + nbytes / self.bandwidth.get(tier, DEFAULT_BANDWIDTH["disk"])

    def observe_load(self, tier: str, nbytes: int, seconds: float, pool_wait_s: float = 0.0) -> None:
        """Update the start-up model from a completed load. Small checkpoints inform the fixed cost, large ones
        the tier's bandwidth (whichever term dominates the prediction gets the error). A pooled load that was
        predicted to wait for a worker (``pool_wait_s`` > 0) teaches neither: its time is mostly that warm-up,
        which the pool reports, and the fixed cost stays that of a load that found a warm worker."""
        self.loads_observed += 1
        if tier == "gpu":
            return
        if pool_wait_s > 0:
            self.waited_loads_observed += 1
            return
        bw = self.bandwidth.get(tier, DEFAULT_BANDWIDTH["disk"])
        transfer = nbytes / bw
        if transfer < self.overhead_s:
            self.overhead_s = (1 - EWMA) * self.overhead_s + EWMA * max(0.0, seconds - transfer)
        else:
            measured = nbytes / max(1e-3, seconds - self.overhead_s)
            self.bandwidth[tier] = (1 - EWMA) * bw + EWMA * measured

    def estimate_recompute_s(self, tokens: int) -> float:
        """Time for this host to take over a stream of ``tokens`` (prompt + generated) by recomputing them."""
        return self.recompute_overhead_s + tokens * self.recompute_s_per_token

    def observe_recompute(self, tokens: int, seconds: float) -> None:
        """Update the recompute model from a migration (its destination's time to first output), the same way
        as loads: the dominant term of the prediction takes the error."""
        self.recomputes_observed += 1
        per_token = tokens * self.recompute_s_per_token
        if per_token < self.recompute_overhead_s:
            self.recompute_overhead_s = (1 - EWMA) * self.recompute_overhead_s + EWMA * max(0.0, seconds - per_token)
        else:
            measured = max(0.0, seconds - self.recompute_overhead_s) / max(1, tokens)
            self.recompute_s_per_token = (1 - EWMA) * self.recompute_s_per_token + EWMA * measured

    def snapshot(self) -> dict:
        return {"name": self.name, "healthy": self.healthy, "grpc": self.cfg.grpc, "http": self.cfg.http,
                "loader": self.cfg.loader, "loader_ok": self.loader_ok, "max_models": self.cfg.max_models,
                "instances": {m: {"state": i.state, "inflight": i.inflight, "error": i.error, "draining": i.draining}
                              for m, i in self.instances.items()},
                "server_models": sorted(self.server_models), "running_sequences": self.running,
                "startup_model": {"overhead_s": round(self.overhead_s, 3),
                                  "bandwidth_Bps": {k: round(v) for k, v in self.bandwidth.items()},
                                  "loads_observed": self.loads_observed,
                                  "waited_for_pool_worker": self.waited_loads_observed},
                "recompute_model": {"overhead_s": round(self.recompute_overhead_s, 4),
                                    "s_per_token": self.recompute_s_per_token,
                                    "migrations_observed": self.recomputes_observed},
                "device": self.cfg.device, "engine_pool": self.cfg.engine_pool,
                "engine_pool_view": self.pool.snapshot(self.pool_device) if self.pool is not None else None}


def checkpoint_bytes(path: str) -> int:
    """Bytes a load reads: the checkpoint folder's files (0 when the router cannot see the path)."""
    p = Path(path)
    if not p.is_dir():
        return 0
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def parse_running(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("tritonmoe_running_sequences{"):
            continue
        m = _METRIC_RE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[labels.get("model", "")] = float(m.group(3))
    return out


def _in_thread(fn, *args) -> asyncio.Future:
    """``fn(*args)`` in a daemon thread of its own, as an awaitable: the event loop never blocks on it, and a call
    that never returns (a pool that accepts but does not answer) cannot hold up the process's exit, as a thread of
    an executor would (its threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result, error):
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def run():
        try:
            result, error = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="pool-status", daemon=True).start()
    return fut


class Poller:
    """Keeps every host's view fresh. A host that fails two polls in a row (or a stream that times out on it)
    is unhealthy until a poll succeeds again. Engine pools (hosts' ``engine_pool``) are asked for their status
    each round, in a thread (``pool_status`` blocks), with a short timeout."""

    def __init__(self, hosts: list[Host], interval: float, timeout: float = 2.0, token: str | None = None,
                 pool_timeout: float = POOL_STATUS_TIMEOUT_S):
        self.hosts, self.interval, self.timeout = hosts, interval, timeout
        self.pools = attach_pools(hosts)
        self.pool_timeout = pool_timeout
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None
        self.loader_token = os.environ.get("TRITONMOE_LOADER_TOKEN")
        self.on_server_lost = None  # callback(host, model): an instance the server no longer has
        self.on_first_poll = None   # coroutine(host): the host answered for the first time (adopt its models)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        await self.poll_all()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel_quietly(self.task)
        if self.session:
            await self.session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_all()
            except Exception:  # noqa: BLE001 - polling must survive anything
                log.exception("poll failed")

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(h) for h in self.hosts), *(self.poll_pool(v) for v in self.pools.values()),
                             return_exceptions=True)

    async def poll_pool(self, view: PoolView) -> None:
        """Refresh ``view`` from its pool's status. No answer within ``pool_timeout`` (not running, key unreadable,
        hung): unknown, logged once until it answers again; a query still out from an earlier round is not
        repeated (a hung pool holds one thread)."""
        from tritonmoe.backend.engine_pool import pool_status  # torch-free; the pool's own client

        if view.querying:
            if view.warm is not None:
                view.unknown(f"no answer within {self.pool_timeout:g}s")
            return

        def query():
            try:
                return pool_status(view.socket)
            finally:
                view.querying = False  # in the thread: also when nobody awaits the answer any more

        view.querying = True
        asked = time.monotonic()
        fut = _in_thread(query)
        # an answer that comes after the timeout is dropped quietly
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            status = await asyncio.wait_for(asyncio.shield(fut), self.pool_timeout)
            if not isinstance(status, dict) or not status.get("ok", True) or "warm" not in status:
                raise ValueError(f"unexpected status reply {status!r:.200}")
        except Exception as e:  # noqa: BLE001 - PoolError, timeout, a malformed reply: all mean "unknown"
            why = f"no answer within {self.pool_timeout:g}s" if isinstance(e, asyncio.TimeoutError) else str(e)
            if view.error is None:
                log.warning("engine pool %s: %s; placement counts no warm worker there until it answers",
                            view.socket, why)
            view.unknown(why)
            return
        if view.error is not None:
            log.info("engine pool %s answers again: warm %s", view.socket, status.get("warm"))
        view.update(status, asked)

    async def poll(self, host: Host) -> None:
        started = time.monotonic()
        try:
            async with self.session.get(f"http://{host.cfg.http}/v2/health/live") as r:
                if r.status != 200:
                    raise OSError(f"live {r.status}")
            async with self.session.get(f"http://{host.cfg.http}/v2/models/stats") as r:
                stats = await r.json() if r.status == 200 else {"model_stats": []}
            host.server_models = {m["name"] for m in stats.get("model_stats", [])}
            if host.cfg.metrics:
                async with self.session.get(host.cfg.metrics) as r:
                    host.running = parse_running(await r.text())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            host.failures += 1
            if host.failures >= 2 and host.healthy:
                log.warning("host %s unhealthy: %s", host.name, e or type(e).__name__)
                host.healthy = False
            return
        if not host.healthy:
            log.info("host %s healthy again", host.name)
        host.failures, host.healthy = 0, True
        for model, inst in list(host.instances.items()):
            # the server lost a model the router believed ready (restart, crash): forget the instance
            # (only instances loaded before this poll asked: a load finishing meanwhile is not in its answer)
            if inst.state == "ready" and inst.loaded_at < started and model not in host.server_models \
                    and self.on_server_lost:
                self.on_server_lost(host, model)
        if host.cfg.loader:
            await self.poll_loader(host)
        if not host.adopted and self.on_first_poll is not None:
            host.adopted = True
            try:
                await self.on_first_poll(host)
            except Exception:  # noqa: BLE001 - adoption is best effort: the models then load under the router
                log.exception("adopting the models loaded on %s", host.name)

    async def poll_loader(self, host: Host) -> None:
        headers = {"Authorization": f"Bearer {self.loader_token}"} if self.loader_token else {}
        try:
            async with self.session.get(f"{host.cfg.loader}/v1/models", headers=headers) as r:
                doc = await r.json()
            host.loader_tiers = {m["name"]: (m["tier"], m.get("bytes")) for m in doc.get("models", [])}
            host.loader_ok = True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            if host.loader_ok is not False:
                log.warning("loader of host %s unreachable: placement treats its checkpoints as disk", host.name)
            host.loader_ok = False


async def cancel_quietly(task: asyncio.Task | None) -> None:
    """Stop a background loop: cancel it and wait, whatever it ends with (it is being shut down)."""
    if task:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
