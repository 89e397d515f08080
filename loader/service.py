"""The per-host loader service: a daemon that keeps converted checkpoints close to the GPUs.

    python -m tritonmoe.loader.service --root /var/lib/tritonmoe-loader --dram-budget 64GiB \\
        --disk-budget 500GiB --port 8073 [--host 127.0.0.1] [--token-file FILE] [--shm-dir DIR]

Tiers, slowest first: **remote** (any fsspec URL: ``https://``, ``s3://``, ``file://`` ...) -> **disk** (remote models
are fetched into ``<root>/disk/<name>``, bounded by ``--disk-budget``, least recently used evicted first; a model
registered by local path is its own disk tier and never counted or deleted) -> **dram** (shared-memory files in
``--shm-dir``, default ``/dev/shm/tritonmoe-loader-<port>``, bounded by ``--dram-budget``, LRU) -> GPU, which the
backend process does itself by mapping the DRAM copy (:mod:`tritonmoe.loader.client`).

HTTP API (JSON; every route but ``/health`` needs ``Authorization: Bearer <token>`` when a token is set):

    GET    /health                            liveness, no auth
    GET    /metrics                           Prometheus text
    GET    /v1/models                         every model's status
    POST   /v1/models          {"name", "source"}   register (idempotent for the same source; 409 for another)
    GET    /v1/models/{name}                  status: tier, bytes, load times, counters
    POST   /v1/models/{name}/load             make it DRAM-resident; answers when it is (or with the error)
    POST   /v1/models/{name}/evict?tier=dram|disk   drop a tier (disk implies dram for remote models)
    POST   /v1/models/{name}/copy             (--gpu-copy) copy byte spans into a backend's GPU buffers (CUDA IPC)
    DELETE /v1/models/{name}                  unregister (and evict)

Concurrent loads of one model share one read: the first request starts the load as a task that a client's
disconnect cannot cancel, and every request for the model waits on that task. Registrations are kept in
``<root>/registry.json``; at start-up complete DRAM copies left by an earlier run are adopted and half-written ones
removed. Errors are JSON ``{"error": ...}`` with 400 (bad input), 401, 404, 409, 502/504 (remote), 507 (does not fit
the DRAM or disk budget) or 500 (corrupt checkpoint: the message names the tensor).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import dram_cache, remote
from .direct_io import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS
from .format import CheckpointError, ChecksumError, CheckpointIndex, read_index

log = logging.getLogger("tritonmoe.loader")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # no '/', so a name is never a path
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_PORT = 8073  # ServerlessLLM's store uses the same port


def parse_bytes(text: str) -> int:
    """``"64GiB"``, ``"1.5GB"``, ``"1048576"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"not a byte size: {text!r} (e.g. 64GiB, 1.5GB, 1048576)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise web.HTTPBadRequest(text=_json({"error": f"invalid model name {name!r}: use 1-128 letters, digits, "
                                             "'.', '_' or '-', starting with a letter or digit, no '..'"}),
                                 content_type="application/json")
    return name


def _json(doc) -> str:
    return json.dumps(doc)


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=_json({"error": message}), content_type="application/json")


@dataclass
class Model:
    name: str
    source: str  # absolute local folder, or a URL
    registered: float = field(default_factory=time.time)
    index: CheckpointIndex | None = None
    on_disk: bool = False  # remote models: fetched into the disk cache
    in_dram: bool = False
    task: asyncio.Task | None = None
    phase: str = ""  # while loading: "remote fetch" / "dram fill"
    last_used: float = 0.0
    disk_used: float = 0.0
    reads: int = 0  # disk -> DRAM fills performed
    fetches: int = 0  # remote -> disk fetches performed
    load_requests: int = 0
    times: dict[str, float] = field(default_factory=dict)  # last load's phases, seconds
    direct_io: bool | None = None
    last_error: str | None = None

    @property
    def remote(self) -> bool:
        return remote.is_url(self.source)

    @property
    def tier(self) -> str:
        if self.task is not None and not self.task.done():
            return "loading"
        if self.in_dram:
            return "dram"
        if not self.remote or self.on_disk:
            return "disk"
        return "remote"


class LoaderService:
    def __init__(self, root: Path, dram_budget: int, disk_budget: int, shm_dir: Path, *, token: str | None = None,
                 threads: int = DEFAULT_THREADS, chunk_bytes: int = DEFAULT_CHUNK_BYTES, direct: bool = True,
                 verify: bool = True, remote_timeout: float = 30.0, gpu_copy: bool = False):
        self.root, self.shm_dir = Path(root), Path(shm_dir)
        self.disk_dir = self.root / "disk"
        self.dram_budget, self.disk_budget = dram_budget, disk_budget
        self.token = token
        self.threads, self.chunk_bytes, self.direct, self.verify = threads, chunk_bytes, direct, verify
        self.remote_timeout = remote_timeout
        self.models: dict[str, Model] = {}
        self.gpu = None
        if gpu_copy:
            from .gpu_copy_server import GpuCopier

            self.gpu = GpuCopier()
        # Loads of different models run side by side; each uses the reader's own pool for its parallel preads.
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="tritonmoe-load")
        self._reserved: dict[str, int] = {}  # DRAM bytes promised to loads in flight
        self._budget_lock = asyncio.Lock()
        self._init_metrics()

    # ---- state on disk -----------------------------------------------------------------------------------------
    def start(self) -> None:
        for d in (self.root, self.disk_dir, self.shm_dir):
            d.mkdir(parents=True, exist_ok=True)
        registry = self.root / "registry.json"
        if registry.is_file():
            for name, doc in json.loads(registry.read_text()).items():
                self.models[name] = Model(name, doc["source"], doc.get("registered", time.time()))
        for entry in self.disk_dir.iterdir():
            model = self.models.get(entry.name)
            if entry.name.startswith(".") or model is None or not model.remote:  # interrupted fetch, or stale
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:  # the disk budget counts fetched models by their index
                model.index, model.on_disk, model.disk_used = read_index(entry), True, entry.stat().st_mtime
            except CheckpointError as e:
                log.warning("removing %s from the disk cache: %s", entry, e)
                shutil.rmtree(entry, ignore_errors=True)
        for model in self.models.values():
            if not model.remote:
                try:
                    model.index = read_index(model.source)
                except CheckpointError as e:  # reported again, with the same message, by the first load
                    log.warning("registered model %s: %s", model.name, e)
        for name, index in dram_cache.scan(self.shm_dir).items():
            model = self.models.get(name)
            if model is None:
                log.info("removing %s from the DRAM cache: not registered", name)
                dram_cache.remove(self.shm_dir / name)
                continue
            model.index, model.in_dram, model.last_used = index, True, time.time()
            log.info("adopted %s from the DRAM cache (%.2f GB)", name, index.total_bytes / 1e9)
        self._update_gauges()

    def _save_registry(self) -> None:
        doc = {m.name: {"source": m.source, "registered": m.registered} for m in self.models.values()}
        tmp = self.root / f".registry.json.{os.getpid()}"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.root / "registry.json")

    def disk_path(self, model: Model) -> Path:
        return self.disk_dir / model.name if model.remote else Path(model.source)

    def dram_bytes(self) -> int:
        return sum(m.index.total_bytes for m in self.models.values() if m.in_dram and m.index)

    def disk_bytes(self) -> int:
        return sum(m.index.total_bytes for m in self.models.values() if m.remote and m.on_disk and m.index)

    # ---- metrics -----------------------------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        r = self.metrics = CollectorRegistry()
        self.m_dram = Gauge("tritonmoe_loader_dram_bytes", "Bytes of checkpoints in the DRAM cache", registry=r)
        self.m_dram_budget = Gauge("tritonmoe_loader_dram_budget_bytes", "DRAM cache budget", registry=r)
        self.m_disk = Gauge("tritonmoe_loader_disk_cache_bytes", "Bytes of fetched checkpoints on disk", registry=r)
        self.m_disk_budget = Gauge("tritonmoe_loader_disk_budget_bytes", "Disk cache budget", registry=r)
        self.m_models = Gauge("tritonmoe_loader_models", "Registered models per tier", ["tier"], registry=r)
        self.m_reads = Counter("tritonmoe_loader_dram_fills", "Disk -> DRAM reads of a whole model", ["model"],
                               registry=r)
        self.m_fetches = Counter("tritonmoe_loader_remote_fetches", "Remote -> disk fetches of a whole model",
                                 ["model"], registry=r)
        self.m_requests = Counter("tritonmoe_loader_load_requests", "Load requests by outcome: hit (already in "
                                  "DRAM), loaded (started the read), joined (waited on a read in flight), error",
                                  ["model", "outcome"], registry=r)
        self.m_bytes = Counter("tritonmoe_loader_read_bytes", "Bytes read from disk into DRAM", registry=r)
        self.m_evictions = Counter("tritonmoe_loader_evictions", "Models evicted", ["tier"], registry=r)
        self.m_seconds = Histogram("tritonmoe_loader_load_seconds", "Seconds per load phase", ["phase"],
                                   buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
        self.m_dram_budget.set(self.dram_budget)
        self.m_disk_budget.set(self.disk_budget)

    def _update_gauges(self) -> None:
        self.m_dram.set(self.dram_bytes())
        self.m_disk.set(self.disk_bytes())
        tiers = {"remote": 0, "disk": 0, "dram": 0, "loading": 0}
        for m in self.models.values():
            tiers[m.tier] += 1
        for tier, n in tiers.items():
            self.m_models.labels(tier).set(n)

    # ---- status ------------------------------------------------------------------------------------------------
    def status(self, model: Model) -> dict:
        return {
            "name": model.name,
            "source": model.source,
            "tier": model.tier,
            "phase": model.phase if model.tier == "loading" else "",
            "bytes": model.index.total_bytes if model.index else None,
            "tensors": len(model.index.tensors) if model.index else None,
            "experts": len(model.index.experts) if model.index else None,
            "fingerprint": model.index.fingerprint if model.index else None,
            "in_dram": model.in_dram,
            "on_disk": (not model.remote) or model.on_disk,
            "shm_path": str(self.shm_dir / model.name) if model.in_dram else None,
            "gpu_copy": self.gpu is not None,  # POST .../copy is served
            "disk_path": str(self.disk_path(model)) if (not model.remote or model.on_disk) else None,
            "load_seconds": model.times,
            "direct_io": model.direct_io,
            "dram_fills": model.reads,
            "remote_fetches": model.fetches,
            "load_requests": model.load_requests,
            "last_used": model.last_used or None,
            "last_error": model.last_error,
        }

    # ---- loading -----------------------------------------------------------------------------------------------
    async def ensure_loaded(self, model: Model) -> None:
        model.load_requests += 1
        if model.in_dram:
            model.last_used = time.time()
            self.m_requests.labels(model.name, "hit").inc()
            return
        if model.task is None or model.task.done():
            model.task = asyncio.get_running_loop().create_task(self._load(model))
            outcome = "loaded"
        else:
            outcome = "joined"
        try:
            # shield: a caller that disconnects must not cancel the read other callers wait on
            await asyncio.shield(model.task)
        except Exception:
            self.m_requests.labels(model.name, "error").inc()
            raise
        self.m_requests.labels(model.name, outcome).inc()

    async def _run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _load(self, model: Model) -> None:
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            if model.remote and not model.on_disk:
                model.phase = "remote fetch"
                self._update_gauges()
                t = time.perf_counter()
                index = await self._run(remote.read_remote_index, model.source, self.remote_timeout)
                await self._make_disk_room(model, index.total_bytes)
                target = self.disk_path(model)
                if target.exists():
                    shutil.rmtree(target)
                model.index = await self._run(remote.fetch_checkpoint, model.source, target,
                                              timeout=self.remote_timeout)
                model.on_disk, model.disk_used = True, time.time()
                model.fetches += 1
                self.m_fetches.labels(model.name).inc()
                times["remote_fetch"] = time.perf_counter() - t
                self.m_seconds.labels("remote_fetch").observe(times["remote_fetch"])
            model.phase = "dram fill"
            self._update_gauges()
            t = time.perf_counter()
            index = await self._run(read_index, self.disk_path(model))
            model.index = index
            times["index_read"] = time.perf_counter() - t
            await self._reserve_dram(model, index.total_bytes)
            try:
                dest = self.shm_dir / model.name
                if dest.exists():  # a stale copy (e.g. a different conversion): replace it
                    dram_cache.remove(dest)
                result = await self._run(dram_cache.fill, self.disk_path(model), dest, threads=self.threads,
                                         chunk_bytes=self.chunk_bytes, direct=self.direct, verify=self.verify)
            finally:
                self._reserved.pop(model.name, None)
            if self.gpu is not None:  # page-lock once here, so backends' GPU copies run at PCIe speed
                times["pin"] = await self._run(self.gpu.pin, model.name, dest)
            model.index, model.in_dram, model.direct_io = result.index, True, result.direct_io
            model.reads += 1
            model.last_used = model.disk_used = time.time()
            self.m_reads.labels(model.name).inc()
            self.m_bytes.inc(result.bytes_read)
            times.update(dram_read=result.read_seconds, verify=result.verify_seconds)
            times["total"] = time.perf_counter() - t0
            for phase in ("index_read", "dram_read", "verify", "total"):
                self.m_seconds.labels(phase).observe(times[phase])
            model.times, model.last_error = times, None
            log.info("%s in DRAM: %.2f GB, read %.2f s (%.2f GB/s, %s), verify %.2f s, total %.2f s", model.name,
                     result.bytes_read / 1e9, result.read_seconds,
                     result.bytes_read / max(result.read_seconds, 1e-9) / 1e9,
                     "O_DIRECT" if result.direct_io else "buffered", result.verify_seconds, times["total"])
        except Exception as e:
            model.last_error = str(e)
            log.error("loading %s failed: %s", model.name, e)
            raise
        finally:
            model.phase = ""
            self._update_gauges()

    async def _reserve_dram(self, model: Model, size: int) -> None:
        async with self._budget_lock:
            if size > self.dram_budget:
                raise dram_cache.DramBudgetError(
                    f"model {model.name!r} needs {size} bytes ({size / 2**30:.2f} GiB) but the DRAM budget is "
                    f"{self.dram_budget} bytes ({self.dram_budget / 2**30:.2f} GiB): it cannot be cached; raise "
                    "--dram-budget or serve it with expert offloading from a larger host")
            while self.dram_bytes() + sum(self._reserved.values()) + size > self.dram_budget:
                victims = [m for m in self.models.values() if m.in_dram and m is not model]
                if not victims:
                    raise dram_cache.DramBudgetError(
                        f"model {model.name!r} needs {size} bytes but {sum(self._reserved.values())} bytes of the "
                        f"{self.dram_budget}-byte DRAM budget are taken by loads in flight; try again")
                victim = min(victims, key=lambda m: m.last_used)
                await self._evict_dram(victim)
            free = dram_cache.free_bytes(self.shm_dir)
            if size > free:
                raise dram_cache.DramBudgetError(
                    f"model {model.name!r} needs {size} bytes but only {free} are free in {self.shm_dir}: shared "
                    "memory is smaller than the DRAM budget; enlarge /dev/shm or lower --dram-budget")
            self._reserved[model.name] = size

    async def _make_disk_room(self, model: Model, size: int) -> None:
        if size > self.disk_budget:
            raise dram_cache.DramBudgetError(
                f"model {model.name!r} needs {size} bytes but the disk cache budget is {self.disk_budget} bytes")
        while self.disk_bytes() + size > self.disk_budget:
            victims = [m for m in self.models.values() if m.remote and m.on_disk and m is not model
                       and not (m.task is not None and not m.task.done())]
            if not victims:
                raise dram_cache.DramBudgetError(f"no room in the disk cache for {model.name!r} ({size} bytes)")
            victim = min(victims, key=lambda m: m.disk_used)
            await self._evict_disk(victim)

    async def _evict_dram(self, model: Model) -> None:
        if not model.in_dram:
            return
        if self.gpu is not None:
            await self._run(self.gpu.unpin, model.name)
        await self._run(dram_cache.remove, self.shm_dir / model.name)
        model.in_dram = False
        self.m_evictions.labels("dram").inc()
        log.info("evicted %s from DRAM", model.name)
        self._update_gauges()

    async def _evict_disk(self, model: Model) -> None:
        if not (model.remote and model.on_disk):
            return
        await self._run(shutil.rmtree, self.disk_path(model), True)
        model.on_disk = False
        self.m_evictions.labels("disk").inc()
        log.info("evicted %s from the disk cache", model.name)
        self._update_gauges()

    # ---- HTTP --------------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.add_routes([
            web.get("/health", self.h_health),
            web.get("/metrics", self.h_metrics),
            web.get("/v1/models", self.h_list),
            web.post("/v1/models", self.h_register),
            web.get("/v1/models/{name}", self.h_status),
            web.delete("/v1/models/{name}", self.h_unregister),
            web.post("/v1/models/{name}/load", self.h_load),
            web.post("/v1/models/{name}/evict", self.h_evict),
            web.post("/v1/models/{name}/copy", self.h_copy),
        ])
        app.on_shutdown.append(lambda _: self._shutdown())
        return app

    async def _shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if self.token is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                raise _error(web.HTTPUnauthorized, "missing or wrong bearer token")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except dram_cache.DramBudgetError as e:
            raise _error(web.HTTPInsufficientStorage, str(e)) from None
        except remote.RemoteError as e:
            status = web.HTTPGatewayTimeout if "timed out" in str(e) else web.HTTPBadGateway
            raise _error(status, str(e)) from None
        except (CheckpointError, ChecksumError) as e:
            raise _error(web.HTTPInternalServerError, str(e)) from None

    def _model(self, request: web.Request) -> Model:
        name = check_name(request.match_info["name"])
        if name not in self.models:
            raise _error(web.HTTPNotFound, f"model {name!r} is not registered")
        return self.models[name]

    async def h_health(self, request):
        return web.json_response({"status": "ok", "pid": os.getpid(), "models": len(self.models)})

    async def h_metrics(self, request):
        self._update_gauges()
        return web.Response(body=generate_latest(self.metrics), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def h_list(self, request):
        return web.json_response({
            "models": [self.status(m) for m in self.models.values()],
            "dram_bytes": self.dram_bytes(), "dram_budget": self.dram_budget,
            "disk_cache_bytes": self.disk_bytes(), "disk_budget": self.disk_budget, "shm_dir": str(self.shm_dir),
        })

    async def h_status(self, request):
        return web.json_response(self.status(self._model(request)))

    async def h_register(self, request):
        try:
            doc = await request.json()
        except ValueError:
            raise _error(web.HTTPBadRequest, "body must be JSON: {\"name\": ..., \"source\": ...}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("source"), str) or not doc["source"].strip():
            raise _error(web.HTTPBadRequest, "body must be JSON with 'name' and 'source' (a folder or a URL)")
        name, source = check_name(doc.get("name")), doc["source"].strip()
        if not remote.is_url(source):
            path = Path(source)
            if not path.is_absolute():
                raise _error(web.HTTPBadRequest, f"source {source!r} must be an absolute folder or a URL")
            if not path.is_dir():
                raise _error(web.HTTPBadRequest, f"source folder {source} does not exist")
            index = await self._run(read_index, path)  # a clear error now rather than at the first load
            source = str(path.resolve())
        existing = self.models.get(name)
        if existing is not None:
            if existing.source != source:
                raise _error(web.HTTPConflict, f"model {name!r} is registered with source {existing.source!r}; "
                                               "unregister it first")
            return web.json_response(self.status(existing))
        self.models[name] = Model(name, source, index=None if remote.is_url(source) else index)
        self._save_registry()
        self._update_gauges()
        log.info("registered %s -> %s", name, source)
        return web.json_response(self.status(self.models[name]), status=201)

    async def h_load(self, request):
        model = self._model(request)
        await self.ensure_loaded(model)
        return web.json_response(self.status(model))

    async def h_copy(self, request):
        model = self._model(request)
        if self.gpu is None:
            raise _error(web.HTTPNotImplemented, "this loader does not copy to GPUs (start it with --gpu-copy)")
        if not model.in_dram:
            raise _error(web.HTTPConflict, f"model {model.name!r} is not in the DRAM cache; load it first")
        try:
            body = await request.json()
        except ValueError:
            raise _error(web.HTTPBadRequest, "body must be JSON") from None
        model.last_used = time.time()
        try:
            result = await self._run(self.gpu.copy, model.name, self.shm_dir / model.name, body)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise _error(web.HTTPBadRequest, f"bad copy request: {e}") from None
        except RuntimeError as e:  # CUDA errors
            raise _error(web.HTTPInternalServerError, f"GPU copy failed: {e}") from None
        return web.json_response(result)

    async def h_evict(self, request):
        model = self._model(request)
        tier = request.query.get("tier", "dram")
        if tier not in ("dram", "disk"):
            raise _error(web.HTTPBadRequest, f"tier must be dram or disk, got {tier!r}")
        if model.tier == "loading":
            raise _error(web.HTTPConflict, f"model {model.name!r} is loading; evict it once the load is done")
        await self._evict_dram(model)
        if tier == "disk":
            await self._evict_disk(model)
        return web.json_response(self.status(model))

    async def h_unregister(self, request):
        model = self._model(request)
        if model.tier == "loading":
            raise _error(web.HTTPConflict, f"model {model.name!r} is loading; unregister it once the load is done")
        await self._evict_dram(model)
        await self._evict_disk(model)
        del self.models[model.name]
        self._save_registry()
        self._update_gauges()
        return web.json_response({"unregistered": model.name})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonmoe.loader.service",
                                description="The tritonmoe per-host loader service (see docs/loader.md).")
    p.add_argument("--root", type=Path, required=True, help="state folder: registry.json and the disk cache")
    p.add_argument("--dram-budget", type=parse_bytes, required=True, help="DRAM cache size, e.g. 64GiB")
    p.add_argument("--disk-budget", type=parse_bytes, required=True,
                   help="disk cache size for models fetched from remote URLs, e.g. 500GiB")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)")
    p.add_argument("--shm-dir", type=Path, default=None,
                   help="shared-memory folder of the DRAM cache (default /dev/shm/tritonmoe-loader-<port>)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding a bearer token that clients must send (or set TRITONMOE_LOADER_TOKEN)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="parallel preads per load")
    p.add_argument("--chunk-mb", type=int, default=DEFAULT_CHUNK_BYTES >> 20, help="bytes per pread, MiB")
    p.add_argument("--buffered", action="store_true", help="never use O_DIRECT")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification of DRAM fills")
    p.add_argument("--remote-timeout", type=float, default=30.0,
                   help="seconds a remote may stall (connect or between bytes) before the load fails")
    p.add_argument("--gpu-copy", action="store_true",
                   help="page-lock DRAM-cache models and copy them into backends' GPU memory (CUDA IPC); needs "
                        "torch with CUDA")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    prometheus_client.disable_created_metrics()  # one series per counter, not a *_created twin each
    token = a.token_file.read_text().strip() if a.token_file else os.environ.get("TRITONMOE_LOADER_TOKEN") or None
    shm_dir = a.shm_dir or Path(f"/dev/shm/tritonmoe-loader-{a.port}")
    try:
        service = LoaderService(a.root, a.dram_budget, a.disk_budget, shm_dir, token=token, threads=a.threads,
                                chunk_bytes=a.chunk_mb << 20, direct=not a.buffered, verify=not a.no_verify,
                                remote_timeout=a.remote_timeout, gpu_copy=a.gpu_copy)
    except RuntimeError as e:
        log.error("%s", e)
        return 2
    service.start()
    log.info("loader service on http://%s:%d (DRAM budget %.2f GiB in %s, disk budget %.2f GiB in %s%s)", a.host,
             a.port, a.dram_budget / 2**30, shm_dir, a.disk_budget / 2**30, service.disk_dir,
             ", bearer token required" if token else "")

    async def serve():
        runner = web.AppRunner(service.app())
        await runner.setup()
        site = web.TCPSite(runner, a.host, a.port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"tritonmoe loader listening on http://{a.host}:{a.port}", flush=True)  # readiness line for scripts
        await stop.wait()
        await runner.cleanup()

    try:
        asyncio.run(serve())
    except OSError as e:
        log.error("cannot serve on %s:%d: %s", a.host, a.port, e)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
