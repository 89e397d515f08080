"""Serverless lifecycle: deployed models are registrations, not running instances. The first request loads the
model where the policy says (Triton's repository API with a ``config`` override and the model code as a file
override), more instances start under load, idle ones unload after their keep-alive, and hosts make room by
unloading their least recently used idle model."""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import upstream
from .config import ModelSpec, RouterConfig
from .placement import Candidate, MigrationPlan, Move, Policy
from .state import Host, Instance, PoolView, attach_pools, cancel_quietly, checkpoint_bytes

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
        attach_pools(hosts)  # hosts naming one engine pool share its view (the poller keeps it fresh)
        self.specs: dict[str, ModelSpec] = dict(cfg.models)
        self.load_failures: dict[str, tuple[float, str]] = {}
        self._bytes: dict[str, int] = {}
        self.instance_seconds = 0.0  # "GPU-seconds": time instances spent loaded, summed at unload
        self.cold_starts: list[dict] = []
        self.avg_request_s = 1.0
        self.sessions: dict = {}  # running StreamSessions by id (the router's registry): what placement can move
        self.placement_log: collections.deque = collections.deque(maxlen=128)  # migrate-or-not decisions
        self.adopted: list[dict] = []  # instances found loaded when the router started
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
        self.m_placement = Counter("tritonmoe_router_placement_decisions",
                                   "Cold starts where a busy host had the better locality: migrate its streams "
                                   "away and start there, wait for them to end, or start on a free host",
                                   ["decision"], registry=r)
        self.m_placement_moves = Counter("tritonmoe_router_placement_migrations",
                                         "Streams migrated to free a host for another model", registry=r)
        self.m_adopted = Counter("tritonmoe_router_adopted_instances",
                                 "Instances found loaded on a server and taken over (router restart)", registry=r)

    # ---- registrations -----------------------------------------------------------------------------------------
    def deploy(self, spec: ModelSpec) -> None:
        old = self.specs.get(spec.name)
        if old is not None and (old.checkpoint, old.parameters, old.use_engine_pool) != (
                spec.checkpoint, spec.parameters, spec.use_engine_pool):
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
    def pool_pending(self, view: PoolView, device: str) -> int:
        """The router's cold starts on ``device`` of the pool ``view`` whose claim the pool's last status does not
        show yet: they take warm workers before a new cold start does. Per model: its instances there (loading,
        ready or unloading: each holds a worker once claimed) less the workers the status shows claimed for it,
        at most the number that may be missing from it (those loading, or begun after that status was asked
        for; an instance loaded before then had claimed its worker by then)."""
        held: collections.Counter = collections.Counter()
        unseen: collections.Counter = collections.Counter()
        for h in self.hosts:
            if h.pool is not view or h.pool_device != device:
                continue
            for i in h.instances.values():
                spec = self.specs.get(i.model)
                if (spec is not None and not spec.use_engine_pool) or i.state == "dead":
                    continue  # loads in its own stub (claims nothing), or is gone
                held[i.model] += 1
                if i.state == "loading" or i.started > view.asked_at:
                    unseen[i.model] += 1
        claimed = view.claimed.get(device, {}) if view.warm is not None else {}
        return sum(min(n, max(0, held[m] - claimed.get(m, 0))) for m, n in unseen.items())

    def pool_wait_s(self, host: Host, spec: ModelSpec) -> float:
        """Predicted wait of a new cold start of ``spec`` on ``host`` for a warm engine-pool worker: 0 when the
        host's device has a warm worker that the router's own pending cold starts there do not take first;
        otherwise the remaining warm-up of the worker it will get (the pool's report; an unknown pool: a whole
        warm-up). 0 for hosts without a pool and models that do not use it."""
        view = host.pool
        if view is None or not spec.use_engine_pool:
            return 0.0
        free = view.warm_on(host.pool_device) - self.pool_pending(view, host.pool_device)
        if free > 0:
            return 0.0
        return view.wait_s(host.pool_device, -free)

    def candidates(self, spec: ModelSpec, exclude: set[str] = frozenset()) -> list[Candidate]:
        out = []
        nbytes = self.nbytes(spec)
        for h in self.hosts:
            if not h.healthy or h.name in exclude:
                continue
            if spec.use_loader and not h.loader_ok:
                continue  # the backend would load through a loader that is down
            inst = h.instances.get(spec.name)
            if inst is not None and (inst.state == "dead" or inst.draining):
                continue  # dead, or its streams are moving away so another model can start there
            queue_s = h.loads_in_flight * h.overhead_s
            if inst is not None and inst.state == "ready":
                seqs = int(spec.parameters.get("max_num_seqs", 8))
                queue_s += (inst.inflight // max(1, seqs)) * self.avg_request_s
                out.append(Candidate(h, "gpu", 0.0, queue_s, inst.inflight))
            elif inst is not None and inst.state == "loading":
                tier = h.tier_of(spec.name, spec.use_loader)
                est = inst.est_load_s if inst.est_load_s is not None else h.estimate_load_s(tier, nbytes)
                left = max(0.0, est - (time.monotonic() - inst.started))
                out.append(Candidate(h, "loading", left, queue_s, inst.inflight))
            else:
                if len(h.resident()) >= h.cfg.max_models and not self._evictable(h):
                    continue  # full of busy models
                tier = h.tier_of(spec.name, spec.use_loader)
                wait = self.pool_wait_s(h, spec)
                out.append(Candidate(h, tier, h.estimate_load_s(tier, nbytes) + wait, queue_s, 0, wait))
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

    async def acquire(self, model: str, exclude: set[str] = frozenset(), allow_migration: bool = True) -> Instance:
        """An instance to send one request to (its in-flight count already taken); loads one if needed. With
        ``placement_migration``, a cold start may first migrate running streams off the host with the best
        locality (not for the streams' own migrations: ``allow_migration`` False)."""
        spec = self.spec(model)
        failed = self.load_failures.get(model)
        if failed and time.monotonic() - failed[0] < self.cfg.load_failure_backoff_s:
            raise RouterError(503, f"model {model!r} failed to load {time.monotonic() - failed[0]:.0f}s ago "
                              f"(not retried for {self.cfg.load_failure_backoff_s:.0f}s): {failed[1]}")
        tried: set[str] = set(exclude)
        deadline = time.monotonic() + self.cfg.load_timeout_s
        attempts = 0
        waiting = False  # decided to wait for the best host's streams to end (logged once per wait)
        while attempts < len(self.hosts):
            cands = self.candidates(spec, tried)
            choice = self.policy.choose(spec, cands, self.loaded_count(model)) if cands else None
            plan = None
            if allow_migration and self.cfg.placement_migration and self.policy.name == "locality" \
                    and (choice is None or choice.tier not in ("gpu", "loading")):
                plan = self._plan_migration(spec, tried, choice)
                decision = None if plan is None else self._decide(spec, plan, choice, quiet_wait=waiting)
                if decision == "wait" and time.monotonic() < deadline:
                    waiting = True
                    await asyncio.sleep(0.1)  # re-planned each round: once the streams end, the host is a candidate
                    continue
                waiting = False
                if decision != "migrate":
                    plan = None
            if choice is None and plan is None:
                if self._full_but_healthy(spec, tried) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)  # every host is full of busy models: wait for one to free up
                    continue
                break
            attempts += 1
            if plan is not None:
                choice = Candidate(plan.host, plan.tier, plan.load_s, plan.migration_s, 0)
                inst = self._start_after_migration(spec, plan)
            else:
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

    # ---- placement-driven migration (ServerlessLLM's locality-aware scheduling with live migration) ---------------
    def _plan_migration(self, spec: ModelSpec, exclude: set[str], baseline: Candidate | None) -> MigrationPlan | None:
        """The best host that is full of busy models but would start ``spec`` sooner than ``baseline`` (the
        policy's cold start on a free host; None: no host has room) once streams are migrated off it: estimated
        start-up = the slowest of the moves (destination's start-up + recomputing the stream's tokens there) +
        loading ``spec`` on the freed host from its tier. None when no such host or no movable streams."""
        nbytes = self.nbytes(spec)
        best = None
        for h in self.hosts:
            if not h.healthy or h.name in exclude or (spec.use_loader and not h.loader_ok):
                continue
            if spec.name in h.instances or len(h.resident()) < h.cfg.max_models or self._evictable(h):
                continue  # an ordinary candidate (or already starting the model)
            tier = h.tier_of(spec.name, spec.use_loader)
            load_s = h.estimate_load_s(tier, nbytes) + self.pool_wait_s(h, spec) + h.loads_in_flight * h.overhead_s
            if baseline is not None and load_s >= baseline.startup_s:
                continue  # its locality is no better than the free host's: nothing to gain
            need = len(h.resident()) - h.cfg.max_models + 1
            moves = sorted(filter(None, (self._move_for(i) for i in h.resident())), key=lambda m: m.cost_s)
            waits = sorted(w for w in (self._wait_for(i) for i in h.resident()) if w is not None)
            if len(moves) < need and len(waits) < need:
                continue
            plan = MigrationPlan(h, tier, load_s, moves[:need] if len(moves) >= need else [],
                                 waits[need - 1] if len(waits) >= need else None)
            if best is None or plan.best_s < best.best_s:
                best = plan
        return best

    def _wait_for(self, inst: Instance) -> float | None:
        """Seconds until every stream on ``inst`` has ended (each one's remaining tokens at its own rate so far),
        after which the instance is idle and can be evicted; None when that cannot be estimated (a stream with
        fewer than two tokens, a request still being placed) or an idle ``inst`` would not be evicted (the
        model's min_instances)."""
        sessions = self._streams_on(inst)
        if sessions is None or sum(1 for h in self.hosts if h.ready_instance(inst.model)) <= \
                self.specs[inst.model].min_instances:
            return None
        remaining = [s.remaining_s() for s in sessions]
        return None if any(r is None for r in remaining) else max(remaining)

    def _streams_on(self, inst: Instance) -> list | None:
        """The streams running on a ready, busy ``inst`` of a known model; None when it is not that, or when some
        of its requests are not streams yet (still being placed)."""
        if inst.model not in self.specs or inst.state != "ready" or inst.inflight == 0:
            return None
        sessions = [s for s in self.sessions.values() if s.source_instance() is inst]
        return sessions if len(sessions) == inst.inflight else None

    def _move_for(self, inst: Instance) -> Move | None:
        """How the streams on ``inst`` would move elsewhere, and what that costs; None if they cannot all move
        (a stream without tokens yet, one already migrating, a request still being placed) or the move would
        leave the model below its min_instances."""
        sessions = self._streams_on(inst)
        if inst.draining or sessions is None or not all(s.migratable() for s in sessions):
            return None
        ispec = self.specs[inst.model]
        dests = self.candidates(ispec, exclude={inst.host.name})
        if not dests:
            return None
        dest = min(dests, key=lambda c: (c.startup_s, c.inflight))
        others = sum(1 for h in self.hosts if h is not inst.host and h.ready_instance(inst.model))
        if others + (0 if dest.tier == "gpu" else 1) < ispec.min_instances:
            return None
        tokens = max(s.num_input_tokens + len(s.tokens) for s in sessions)
        return Move(inst, dest, sessions, tokens, dest.startup_s + dest.host.estimate_recompute_s(tokens))

    def _decide(self, spec: ModelSpec, plan: MigrationPlan, baseline: Candidate | None,
                quiet_wait: bool = False) -> str:
        """``migrate``, ``wait`` (for the best host's streams to end) or ``start_elsewhere`` (the policy's cold
        start on a free host), whichever is estimated to start the model soonest; with no free host, the sooner of
        migrating and waiting. Logged with its estimates, counted, kept for /admin/hosts (a "wait" again while
        already waiting, ``quiet_wait``, is not: the acquire loop re-plans every 0.1 s)."""
        options = {"migrate": plan.total_s, "wait": plan.wait_total_s}
        if baseline is not None:
            options["start_elsewhere"] = baseline.startup_s
        tie_order = ("migrate", "start_elsewhere", "wait")  # a tie: migrate, as before the wait option; never wait
        decision = min(options, key=lambda k: (options[k], tie_order.index(k)))
        if quiet_wait and decision == "wait":
            return decision
        inf = float("inf")
        entry = {"time": round(time.time(), 3), "model": spec.name, "decision": decision,
                 "best_host": plan.host.name, "best_tier": plan.tier, "best_load_s": round(plan.load_s, 3),
                 "migration_s": round(plan.migration_s, 3) if plan.moves else None,
                 "migrate_total_s": round(plan.total_s, 3) if plan.moves else None,
                 "wait_s": None if plan.wait_s is None else round(plan.wait_s, 3),
                 "wait_total_s": round(plan.wait_total_s, 3) if plan.wait_total_s < inf else None,
                 "moves": [{"model": m.inst.model, "from": m.inst.host.name, "to": m.dest.host.name,
                            "to_tier": m.dest.tier, "streams": len(m.sessions), "tokens": m.tokens,
                            "cost_s": round(m.cost_s, 3)} for m in plan.moves],
                 "alternative_host": baseline.host.name if baseline else None,
                 "alternative_tier": baseline.tier if baseline else None,
                 "alternative_s": round(baseline.startup_s, 3) if baseline else None}
        self.placement_log.append(entry)
        self.m_placement.labels(entry["decision"]).inc()
        moves = ", ".join(f"{m['streams']} stream(s) of {m['model']} {m['from']}->{m['to']} ({m['to_tier']}, "
                          f"{m['tokens']} tokens, est. {m['cost_s']:.2f}s)" for m in entry["moves"])
        alt = (f"start on {baseline.host.name} from {baseline.tier}: est. {baseline.startup_s:.2f}s" if baseline
               else "no host has room")
        wait = (f"wait {plan.wait_s:.2f}s for its streams to end: est. {plan.wait_total_s:.2f}s"
                if plan.wait_s is not None else "waiting: no estimate")
        log.info("placement of %s: %s | migrate %s, then load on %s from %s (est. %.2fs): est. %.2fs | %s | %s",
                 spec.name, decision.upper(), moves or "(cannot)", plan.host.name, plan.tier, plan.load_s,
                 plan.total_s, wait, alt)
        return decision

    def _start_after_migration(self, spec: ModelSpec, plan: MigrationPlan) -> Instance:
        """A loading instance on the plan's host, joinable at once; it loads once the streams have moved."""
        inst = self._new_instance(plan.host, spec, plan.tier)
        for m in plan.moves:
            m.inst.draining = True  # no new requests: they go to the destination
        asyncio.ensure_future(self._migrate_then_load(spec, plan, inst))
        return inst

    async def _migrate_then_load(self, spec: ModelSpec, plan: MigrationPlan, inst: Instance) -> None:
        host = plan.host
        try:
            for m in plan.moves:
                mspec = self.specs.get(m.inst.model)
                dest = m.dest.host.instances.get(m.inst.model)
                if mspec is not None and (dest is None or dest.state not in ("ready", "loading")):
                    dest = await self._start_load(m.dest.host, mspec, m.dest.tier)
                if dest is not None and dest.state == "loading":
                    await asyncio.wait_for(dest.ready.wait(), self.cfg.load_timeout_s)
                if dest is None or dest.state != "ready":
                    raise RuntimeError(f"{m.inst.model} did not start on {m.dest.host.name}: "
                                       f"{dest.error if dest else 'undeployed'}")
                results = await asyncio.gather(*(s.migrate(m.dest.host.name) for s in m.sessions),
                                               return_exceptions=True)
                for s, r in zip(m.sessions, results):
                    if isinstance(r, BaseException):
                        log.warning("placement of %s: request %s did not migrate (%s); it finishes on %s",
                                    spec.name, s.id, r, m.inst.host.name)
                    else:
                        self.m_placement_moves.inc()
        except Exception as e:  # noqa: BLE001 - the streams finish where they are; the load waits for them
            log.warning("placement of %s on %s: migration failed (%s); waiting for the host to free up",
                        spec.name, host.name, e)
        # the sources stop at hand-over (a stream that could not move finishes where it is); then there is room
        deadline = time.monotonic() + self.cfg.load_timeout_s
        while any(m.inst.inflight for m in plan.moves) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if any(m.inst.inflight for m in plan.moves):
            for m in plan.moves:
                m.inst.draining = False
            inst.state, inst.error = "dead", f"host {host.name} did not free up within {self.cfg.load_timeout_s:.0f}s"
            host.instances.pop(spec.name, None)
            inst.ready.set()
            return
        await self._load(host, spec, inst, plan.tier)  # unloads the now idle instances to make room
        for m in plan.moves:
            m.inst.draining = False  # one still there (another idle model was unloaded instead) serves again

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
        inst = self._new_instance(host, spec, tier)
        asyncio.ensure_future(self._load(host, spec, inst, tier))
        return inst

    def _new_instance(self, host: Host, spec: ModelSpec, tier: str) -> Instance:
        """A loading instance, with the start-up predicted now (before it counts as one of the device's pending
        cold starts): what later requests see as its time left, and whether it was expected to wait for a pool
        worker (such a load does not teach the fixed cost)."""
        wait = self.pool_wait_s(host, spec)
        inst = Instance(spec.name, host, est_load_s=host.estimate_load_s(tier, self.nbytes(spec)) + wait,
                        pool_wait_s=wait)
        host.instances[spec.name] = inst
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
            self.m_cold.labels(host.name, tier).inc()
            config = self.model_config(host, spec)
            await upstream.load(host.client, spec.name, config, self.cfg.load_timeout_s)
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
            host.observe_load(tier, self.nbytes(spec), seconds, inst.pool_wait_s)
            self.m_load_s.labels(host.name, tier).observe(seconds)
            self.cold_starts.append({"model": spec.name, "host": host.name, "tier": tier, "seconds": seconds,
                                     "estimated_s": round(inst.est_load_s or 0.0, 3),
                                     "pool_wait_s": round(inst.pool_wait_s, 3)})
            log.info("loaded %s on %s from %s in %.2fs (estimated %.2fs%s)", spec.name, host.name, tier, seconds,
                     inst.est_load_s or 0.0, f", {inst.pool_wait_s:.2f}s of it waiting for a pool worker"
                     if inst.pool_wait_s else "")
        finally:
            host.loads_in_flight -= 1
            inst.ready.set()
            self._update_gauge(spec.name)

    @staticmethod
    def model_config(host: Host, spec: ModelSpec) -> dict:
        """The Triton config the router loads ``spec`` with on ``host``: the host's device, its loader (models that
        use it: the checkpoint is then the loader's name for it) and its warm engine pool (models that use it)."""
        loader = host.cfg.loader if spec.use_loader else None
        params = dict(spec.parameters)
        if host.cfg.engine_pool and spec.use_engine_pool:
            params["engine_pool"] = host.cfg.engine_pool
        return upstream.model_config(spec.name, spec.name if loader else spec.checkpoint, params, loader,
                                     host.cfg.instance_group)

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

    async def adopt(self, host: Host) -> None:
        """Take over the deployed models a server already has loaded when the router first reaches it (a router
        restarted under running servers): they count as warm instances, loaded now, and keep-alive applies; no
        reload. A model loaded with another checkpoint or other parameters is left alone (the router's first load
        of it replaces it)."""
        for name in sorted(host.server_models):
            spec = self.specs.get(name)
            if spec is None or name in host.instances:
                continue
            try:
                doc = await asyncio.wait_for(host.client.get_model_config(name, as_json=True), 10)
            except Exception as e:  # noqa: BLE001
                log.warning("host %s: cannot read the config of loaded model %s (%s); not adopted", host.name, name, e)
                continue
            config = doc.get("config", doc)
            have = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
            want = self.model_config(host, spec)
            mismatch = sorted(k for k, v in want["parameters"].items() if have.get(k) != v["string_value"])
            if mismatch:
                log.warning("host %s has %s loaded with other %s; not adopted", host.name, name, mismatch)
                continue
            now = time.monotonic()
            inst = Instance(name, host, state="ready", last_used=now, loaded_at=now)
            inst.ready.set()
            host.instances[name] = inst
            self.adopted.append({"model": name, "host": host.name})
            self.m_adopted.inc()
            self._update_gauge(name)
            log.info("adopted %s on %s: loaded before this router started (keep-alive counts from now)", name,
                     host.name)

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
