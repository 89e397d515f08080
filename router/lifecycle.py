"""Serverless lifecycle: deployed models are registrations, not running instances. The first request loads the
model where the policy says (Triton's repository API with a ``config`` override and the model code as a file
override), more instances start under load, idle ones unload after their keep-alive, and hosts make room by
unloading their least recently used idle model."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import upstream
from .config import ModelSpec, RouterConfig
from .placement import Candidate, Policy
from .state import Host, Instance, cancel_quietly, checkpoint_bytes

log = logging.getLogger("tritonmoe.router")


class RouterError(Exception):
    """An error the client sees: HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Manager:
    def __init__(self, cfg: RouterConfig, hosts: list[Host], policy: Policy,
                 registry: CollectorRegistry | None = None):
        self.cfg, self.hosts, self.policy = cfg, hosts, policy
        self.specs: dict[str, ModelSpec] = dict(cfg.models)
        self.load_failures: dict[str, tuple[float, str]] = {}
        self._bytes: dict[str, int] = {}
        self.instance_seconds = 0.0  # "GPU-seconds": time instances spent loaded, summed at unload
        self.cold_starts: list[dict] = []
        self.avg_request_s = 1.0
        self.task: asyncio.Task | None = None
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.m_cold = Counter("tritonmoe_router_cold_starts", "Model loads started by the router", ["host", "tier"],
                              registry=r)
        self.m_load_s = Histogram("tritonmoe_router_load_seconds", "Observed load time", ["host", "tier"],
                                  buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300), registry=r)
        self.m_load_fail = Counter("tritonmoe_router_load_failures", "Failed loads", ["host"], registry=r)
        self.m_unloads = Counter("tritonmoe_router_unloads", "Unloads", ["reason"], registry=r)
        self.m_instances = Gauge("tritonmoe_router_instances", "Ready instances", ["model"], registry=r)

    # ---- registrations -----------------------------------------------------------------------------------------
    def deploy(self, spec: ModelSpec) -> None:
        old = self.specs.get(spec.name)
        if old is not None and (old.checkpoint, old.parameters) != (spec.checkpoint, spec.parameters):
            raise RouterError(409, f"model {spec.name!r} is deployed with another checkpoint or parameters; "
                              "delete it first")
        self.specs[spec.name] = spec
        self.load_failures.pop(spec.name, None)

    async def undeploy(self, name: str) -> None:
        if name not in self.specs:
            raise RouterError(404, f"model {name!r} is not deployed")
        del self.specs[name]
        await asyncio.gather(*(self.unload(h, name, "deleted") for h in self.hosts if name in h.instances),
                             return_exceptions=True)

    def spec(self, name: str) -> ModelSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise RouterError(404, f"unknown model {name!r}; deployed: {sorted(self.specs)}")
        return spec

    def nbytes(self, spec: ModelSpec) -> int:
        if spec.name not in self._bytes:
            self._bytes[spec.name] = checkpoint_bytes(spec.checkpoint)
        return self._bytes[spec.name]

    # ---- placement ---------------------------------------------------------------------------------------------
    def candidates(self, spec: ModelSpec, exclude: set[str] = frozenset()) -> list[Candidate]:
        out = []
        nbytes = self.nbytes(spec)
        for h in self.hosts:
            if not h.healthy or h.name in exclude:
                continue
            if spec.use_loader and not h.loader_ok:
                continue  # the backend would load through a loader that is down
            inst = h.instances.get(spec.name)
            if inst is not None and inst.state == "dead":
                continue
            queue_s = h.loads_in_flight * h.overhead_s
            if inst is not None and inst.state == "ready":
                seqs = int(spec.parameters.get("max_num_seqs", 8))
                queue_s += (inst.inflight // max(1, seqs)) * self.avg_request_s
                out.append(Candidate(h, "gpu", 0.0, queue_s, inst.inflight))
            elif inst is not None and inst.state == "loading":
                tier = h.tier_of(spec.name, spec.use_loader)
                left = max(0.0, h.estimate_load_s(tier, nbytes) - (time.monotonic() - inst.last_used))
                out.append(Candidate(h, "loading", left, queue_s, inst.inflight))
            else:
                if len(h.resident()) >= h.cfg.max_models and not self._evictable(h):
                    continue  # full of busy models
                tier = h.tier_of(spec.name, spec.use_loader)
                out.append(Candidate(h, tier, h.estimate_load_s(tier, nbytes), queue_s, 0))
        return out

    def _evictable(self, host: Host) -> Instance | None:
        idle = [i for i in host.instances.values() if i.state == "ready" and i.inflight == 0
                and sum(1 for h in self.hosts if h.ready_instance(i.model)) > self.specs.get(
                    i.model, ModelSpec(i.model, "/")).min_instances]
        return min(idle, key=lambda i: i.last_used) if idle else None

    def _full_but_healthy(self, spec: ModelSpec, exclude: set[str]) -> bool:
        return any(h.healthy and h.name not in exclude and (h.loader_ok or not spec.use_loader)
                   and len(h.resident()) >= h.cfg.max_models for h in self.hosts)

    def loaded_count(self, model: str) -> int:
        return sum(1 for h in self.hosts if h.healthy and (i := h.instances.get(model)) is not None
                   and i.state in ("ready", "loading"))

    async def acquire(self, model: str, exclude: set[str] = frozenset()) -> Instance:
        """An instance to send one request to (its in-flight count already taken); loads one if needed."""
        spec = self.spec(model)
        failed = self.load_failures.get(model)
        if failed and time.monotonic() - failed[0] < self.cfg.load_failure_backoff_s:
            raise RouterError(503, f"model {model!r} failed to load {time.monotonic() - failed[0]:.0f}s ago "
                              f"(not retried for {self.cfg.load_failure_backoff_s:.0f}s): {failed[1]}")
        tried: set[str] = set(exclude)
        deadline = time.monotonic() + self.cfg.load_timeout_s
        attempts = 0
        while attempts < len(self.hosts):
            cands = self.candidates(spec, tried)
            if not cands:
                if self._full_but_healthy(spec, tried) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)  # every host is full of busy models: wait for one to free up
                    continue
                break
            attempts += 1
            choice = self.policy.choose(spec, cands, self.loaded_count(model))
            inst = choice.host.instances.get(model)
            if inst is None or inst.state not in ("ready", "loading"):
                inst = await self._start_load(choice.host, spec, choice.tier)
            inst.inflight += 1
            inst.last_used = time.monotonic()
            try:
                if inst.state == "loading":
                    await asyncio.wait_for(inst.ready.wait(), self.cfg.load_timeout_s)
                if inst.state != "ready":
                    raise upstream.UpstreamError("load" if inst.error and "load" in inst.error else "server",
                                                 inst.error or "instance went away")
            except (upstream.UpstreamError, asyncio.TimeoutError) as e:
                inst.inflight -= 1
                kind = getattr(e, "kind", "server")
                if kind == "load":
                    raise RouterError(502, f"model {model!r} could not be loaded on host {choice.host.name}: "
                                      f"{inst.error}") from None
                tried.add(choice.host.name)
                continue
            self._maybe_scale_out(spec)
            return inst
        raise RouterError(503, f"no healthy host can serve {model!r} now"
                          + (f" (tried {sorted(tried - set(exclude))})" if tried - set(exclude) else ""))

    def release(self, inst: Instance, seconds: float | None = None) -> None:
        inst.inflight = max(0, inst.inflight - 1)
        inst.last_used = time.monotonic()
        if seconds is not None:
            self.avg_request_s = 0.9 * self.avg_request_s + 0.1 * seconds

    def _maybe_scale_out(self, spec: ModelSpec) -> None:
        ready = [h.instances[spec.name] for h in self.hosts if h.healthy and spec.name in h.instances
                 and h.instances[spec.name].state in ("ready", "loading")]
        if self.policy.name != "locality" or len(ready) >= spec.max_instances:
            return
        if any(i.state == "loading" for i in ready) or any(i.inflight < spec.target_concurrency for i in ready):
            return
        cold = [c for c in self.candidates(spec) if c.tier not in ("gpu", "loading")]
        if cold:
            best = min(cold, key=lambda c: c.startup_s)
            log.info("scaling %s out to host %s (%d instances at target concurrency %d)", spec.name,
                     best.host.name, len(ready), spec.target_concurrency)
            asyncio.ensure_future(self._start_load(best.host, spec, best.tier))

    # ---- loading and unloading ---------------------------------------------------------------------------------
    async def _start_load(self, host: Host, spec: ModelSpec, tier: str) -> Instance:
        existing = host.instances.get(spec.name)
        if existing is not None and existing.state in ("ready", "loading"):
            return existing
        inst = Instance(spec.name, host)
        host.instances[spec.name] = inst
        asyncio.ensure_future(self._load(host, spec, inst, tier))
        return inst

    async def _load(self, host: Host, spec: ModelSpec, inst: Instance, tier: str) -> None:
        host.loads_in_flight += 1
        t0 = time.monotonic()
        try:
            while len(host.resident()) > host.cfg.max_models:
                victim = self._evictable(host)
                if victim is None:
                    break
                await self.unload(host, victim.model, "make room")
            loader = host.cfg.loader if spec.use_loader else None
            if loader:
                await self._register_with_loader(host, spec)
            ckpt = spec.name if loader else spec.checkpoint
            self.m_cold.labels(host.name, tier).inc()
            await upstream.load(host.client, spec.name, upstream.model_config(spec.name, ckpt, spec.parameters,
                                                                              loader), self.cfg.load_timeout_s)
        except upstream.UpstreamError as e:
            inst.state, inst.error = "dead", f"{e.kind}: {e}" if e.kind != "load" else f"load failed: {e}"
            host.instances.pop(spec.name, None)
            self.m_load_fail.labels(host.name).inc()
            if e.kind == "load":
                self.load_failures[spec.name] = (time.monotonic(), str(e))
            log.warning("loading %s on %s failed: %s", spec.name, host.name, e)
        except Exception as e:  # noqa: BLE001 - never leave waiters hanging
            inst.state, inst.error = "dead", f"load failed: {e}"
            host.instances.pop(spec.name, None)
            log.exception("loading %s on %s", spec.name, host.name)
        else:
            seconds = time.monotonic() - t0
            inst.state, inst.loaded_at = "ready", time.monotonic()
            host.server_models.add(spec.name)
            host.observe_load(tier, self.nbytes(spec), seconds)
            self.m_load_s.labels(host.name, tier).observe(seconds)
            self.cold_starts.append({"model": spec.name, "host": host.name, "tier": tier, "seconds": seconds})
            log.info("loaded %s on %s from %s in %.2fs", spec.name, host.name, tier, seconds)
        finally:
            host.loads_in_flight -= 1
            inst.ready.set()
            self._update_gauge(spec.name)

    async def _register_with_loader(self, host: Host, spec: ModelSpec) -> None:
        from tritonmoe.loader.client import LoaderClient, LoaderError

        def register():
            LoaderClient(host.cfg.loader, timeout=10).register(spec.name, spec.checkpoint)

        try:
            await asyncio.get_running_loop().run_in_executor(None, register)
        except LoaderError as e:
            if e.status != 409:
                raise upstream.UpstreamError("server" if e.status is None else "load",
                                             f"loader of {host.name}: {e}") from None

    async def unload(self, host: Host, model: str, reason: str) -> None:
        inst = host.instances.get(model)
        if inst is not None:
            if inst.loaded_at:
                self.instance_seconds += time.monotonic() - inst.loaded_at
            inst.state = "unloading"
        self.m_unloads.labels(reason).inc()
        try:
            await upstream.unload(host.client, model)
        except upstream.UpstreamError as e:
            log.warning("unloading %s on %s: %s", model, host.name, e)
        finally:
            if host.instances.get(model) is inst:
                host.instances.pop(model, None)
            host.server_models.discard(model)
            self._update_gauge(model)
        log.info("unloaded %s on %s (%s)", model, host.name, reason)

    def mark_dead(self, inst: Instance, why: str) -> None:
        """The instance's stub died (Triton keeps the model READY): drop it and unload it so it can be loaded
        again; the request that found out fails over by the resume path."""
        if inst.state == "dead":
            return
        log.warning("instance %s on %s is dead: %s", inst.model, inst.host.name, why)
        if inst.loaded_at:
            self.instance_seconds += time.monotonic() - inst.loaded_at
            inst.loaded_at = 0.0
        inst.state, inst.error = "dead", why
        asyncio.ensure_future(self.unload(inst.host, inst.model, "dead stub"))

    def server_lost(self, host: Host, model: str) -> None:
        inst = host.instances.get(model)
        if inst is not None and inst.state == "ready":
            log.warning("host %s no longer has %s loaded", host.name, model)
            host.instances.pop(model, None)
            self._update_gauge(model)

    def _update_gauge(self, model: str) -> None:
        self.m_instances.labels(model).set(sum(1 for h in self.hosts if h.ready_instance(model)))

    def loaded_seconds(self) -> float:
        now = time.monotonic()
        return self.instance_seconds + sum(now - i.loaded_at for h in self.hosts for i in h.instances.values()
                                           if i.state == "ready" and i.loaded_at)

    async def _probe_idle(self, now: float) -> None:
        """Find dead stubs on idle instances before a request does (Triton 2.51 keeps such models READY)."""
        due = [i for h in self.hosts if h.healthy for i in h.instances.values()
               if i.state == "ready" and i.inflight == 0 and now - max(i.last_used, i.probed) > self.cfg.probe_interval_s]
        if not due:
            return
        results = await asyncio.gather(*(upstream.probe(i.host.client, i.model, 5.0) for i in due))
        for inst, err in zip(due, results):
            inst.probed = time.monotonic()
            if err is not None and err.kind == "stub" and inst.inflight == 0:
                self.mark_dead(inst, f"idle probe: {err}")

    # ---- keep-alive and minimum instances ----------------------------------------------------------------------
    async def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel_quietly(self.task)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001
                log.exception("lifecycle tick")
            await asyncio.sleep(min(1.0, self.cfg.poll_interval_s))

    async def tick(self) -> None:
        now = time.monotonic()
        await self._probe_idle(now)
        for spec in list(self.specs.values()):
            ready = [h.instances[spec.name] for h in self.hosts if h.ready_instance(spec.name) and h.healthy]
            idle = sorted((i for i in ready if i.inflight == 0 and now - i.last_used > spec.keep_alive_s),
                          key=lambda i: i.last_used)
            for inst in idle[:max(0, len(ready) - spec.min_instances)]:
                if inst.inflight == 0 and inst.state == "ready":  # a request may have taken it meanwhile
                    await self.unload(inst.host, spec.name, "keep-alive expired")
            if self.loaded_count(spec.name) < spec.min_instances:
                failed = self.load_failures.get(spec.name)
                if failed and now - failed[0] < self.cfg.load_failure_backoff_s:
                    continue
                cands = [c for c in self.candidates(spec) if c.tier not in ("gpu", "loading")]
                if cands:
                    best = min(cands, key=lambda c: c.startup_s)
                    await self._start_load(best.host, spec, best.tier)
