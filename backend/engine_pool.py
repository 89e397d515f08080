"""The warm engine pool: a per-host daemon that keeps engine worker processes started, so a model load only moves
weights into an already-running process.

A Triton model load through a plain Python-backend stub pays for a fresh process that imports torch and
transformers and creates a CUDA context before any weight moves (about 9 s of the 11.6 s load-to-first-token
measured through the loader on the H100, docs/loader.md). The pool pays that ahead of time: each worker
(:mod:`tritonmoe.backend.engine_worker`) imports torch, transformers and the model classes, creates its CUDA
context on its device, warms cuBLAS and the kernels of a tiny MoE forward, and then waits. A model whose
``config.pbtxt`` sets ``engine_pool`` (this daemon's socket) claims one warm worker at ``initialize``; its stub
stays torch-free and talks to the worker over a Unix socket; the pool starts a replacement at once.

    tritonmoe-engine-pool --socket /run/tritonmoe/pool.sock --devices 0,1 --per-device 1
    tritonmoe-engine-pool --socket /run/tritonmoe/pool.sock --status        # health: JSON of the workers

Transport: :mod:`multiprocessing.connection` over ``AF_UNIX`` sockets (mode 0600) with an HMAC challenge on a
random key kept in ``<socket>.key`` (mode 0600), which the stub reads; workers get the key in their environment.
Nothing listens on TCP. The pool is not in the data path: a stub talks to its worker directly, so a running model
keeps serving if the pool stops; a worker exits when its stub closes the connection or dies (the GPU is freed).

Worker life: ``starting`` (importing, warming) -> ``warm`` (prints ``READY``; listens on its own socket) ->
``claimed`` (the pool wrote ``claimed`` to its stdin and gave its address to one stub) -> exited (unload, stub gone,
killed). A warm worker whose pool goes away (stdin EOF) exits; a claimed one does not (it serves a live model).
This module imports neither torch nor transformers: Triton stubs import it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import AuthenticationError, Client, Listener
from pathlib import Path

KEY_SUFFIX = ".key"
ENV_KEY = "TRITONMOE_ENGINE_POOL_KEY"  # the workers' copy of the key (hex)
CLAIM_TIMEOUT = 120.0  # seconds a claim waits for a warm worker (a replacement takes seconds to warm up)
SUN_PATH_MAX = 107  # bytes of an AF_UNIX socket path (Linux sun_path is 108 with the NUL)

log = logging.getLogger("tritonmoe.engine_pool")


class PoolError(RuntimeError):
    """The pool or a worker could not be reached or refused; the message says which and why."""


# ---- what travels between a worker and its stub (kept here: both sides import this module) ----------------------
@dataclass
class Reply:
    """One engine output as the stub sees it (the fields of :class:`tritonmoe.backend.engine.Output`)."""

    seq_id: str
    text: str
    prompt_tokens: int
    output_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled | error | invalid | unavailable
    error: str | None = None
    ttft: float | None = None
    itl: float | None = None
    token_ids: tuple[int, ...] = ()


def to_wire(out) -> tuple:
    return (out.seq_id, out.text, out.prompt_tokens, out.output_tokens, out.finished, out.finish_reason, out.error,
            out.ttft, out.itl, tuple(out.token_ids))


def from_wire(wire: tuple) -> Reply:
    return Reply(*wire)


# ---- client side (Triton stubs, tools) ---------------------------------------------------------------------------
def key_path(socket_path: str | os.PathLike) -> Path:
    return Path(f"{socket_path}{KEY_SUFFIX}")


def _read_key(socket_path: str) -> bytes:
    try:
        return bytes.fromhex(key_path(socket_path).read_text().strip())
    except (OSError, ValueError) as e:
        raise PoolError(f"cannot reach the engine pool at {socket_path}: its key file {key_path(socket_path)} "
                        f"cannot be read ({e}); is tritonmoe-engine-pool running with --socket {socket_path}?") from e


def _connect(address: str, key: bytes, what: str):
    try:
        return Client(address, family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError) as e:
        raise PoolError(f"cannot reach {what} at {address}: {type(e).__name__}: {e}") from e


def _request(socket_path: str, message: dict) -> dict:
    key = _read_key(socket_path)
    try:
        conn = Client(socket_path, family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError) as e:
        raise PoolError(f"cannot reach the engine pool at {socket_path} ({type(e).__name__}: {e}); is "
                        f"tritonmoe-engine-pool running with --socket {socket_path}?") from e
    try:
        conn.send(message)
        return conn.recv()
    except (OSError, EOFError) as e:
        raise PoolError(f"the engine pool at {socket_path} closed the connection ({type(e).__name__}: {e})") from e
    finally:
        conn.close()


def pool_status(socket_path: str) -> dict:
    return _request(str(socket_path), {"op": "status"})


def claim_worker(socket_path: str, device: str, model: str, timeout: float = CLAIM_TIMEOUT):
    """Claim a warm worker for ``device`` (``cpu``, ``cuda:N`` or ``auto``) and connect to it. Returns the open
    connection and the pool's record of the worker (``pid``, ``device``, ``warm`` phases)."""
    socket_path = str(socket_path)
    reply = _request(socket_path, {"op": "claim", "device": device, "model": model, "timeout": timeout})
    if not reply.get("ok"):
        raise PoolError(f"the engine pool at {socket_path} has no worker for this model: {reply.get('error')}")
    worker = reply["worker"]
    conn = _connect(worker["address"], _read_key(socket_path), f"engine worker pid {worker['pid']}")
    return conn, worker


# ---- the daemon --------------------------------------------------------------------------------------------------
@dataclass
class Worker:
    proc: subprocess.Popen
    device: str
    address: str
    started: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting | warm | claimed | exited
    warm: dict | None = None  # what the worker reported when warm (its start-up phases)
    model: str | None = None
    claimed_at: float | None = None

    def record(self) -> dict:
        return {"pid": self.proc.pid, "device": self.device, "state": self.state, "address": self.address,
                "model": self.model, "warm": self.warm, "age_s": round(time.monotonic() - self.started, 3)}


def parse_devices(text: str) -> list[str]:
    """``cpu``, ``0,1`` or ``cuda:0,cpu`` -> ``["cpu"]``, ``["cuda:0", "cuda:1"]``, ..."""
    devices = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item == "cpu":
            devices.append("cpu")
        elif item.isdigit():
            devices.append(f"cuda:{int(item)}")
        elif item.startswith("cuda:") and item[5:].isdigit():
            devices.append(f"cuda:{int(item[5:])}")
        else:
            raise ValueError(f"--devices: {item!r} is neither 'cpu' nor a GPU index")
    if not devices:
        raise ValueError("--devices names no device")
    return list(dict.fromkeys(devices))


class EnginePool:
    def __init__(self, socket_path: str | os.PathLike, devices: list[str], per_device: int = 1, *,
                 python: str = sys.executable, worker_args: list[str] | None = None, replace_delay: float = 0.0):
        self.socket_path = str(Path(socket_path).absolute())
        if len(os.fsencode(self.socket_path)) > SUN_PATH_MAX:
            raise PoolError(f"socket path {self.socket_path} is longer than {SUN_PATH_MAX} bytes (a Unix socket's "
                            "limit); choose a shorter one")
        self.devices, self.per_device = devices, per_device
        self.replace_delay = replace_delay  # seconds between a claim and its replacement's start
        self.python, self.worker_args = python, list(worker_args or [])
        self.workers: list[Worker] = []
        self.cond = threading.Condition()
        self.failures = {d: 0 for d in devices}
        self.next_spawn = {d: 0.0 for d in devices}
        self.last_error = {d: None for d in devices}
        self.stopping = False
        self.serial = 0
        self.started = time.monotonic()
        self.claims = 0
        self.key = secrets.token_bytes(32)
        self.run_dir = tempfile.mkdtemp(prefix="tritonmoe-pool-")  # workers' sockets (mode 0700, short paths)

    # -- workers ----------------------------------------------------------------------------------------------
    def _spawn(self, device: str) -> None:
        self.serial += 1
        address = os.path.join(self.run_dir, f"w{self.serial}.sock")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{ENV_KEY: self.key.hex()})
        cmd = [self.python, "-m", "tritonmoe.backend.engine_worker", "--address", address, "--device", device,
               *self.worker_args]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                start_new_session=True)  # a Ctrl-C at the pool's terminal must not kill live models
        worker = Worker(proc, device, address)
        self.workers.append(worker)
        log.info("worker %d (%s): starting", proc.pid, device)
        threading.Thread(target=self._watch_stdout, args=(worker,), name=f"pool-worker-{proc.pid}",
                         daemon=True).start()

    def _watch_stdout(self, worker: Worker) -> None:
        for line in worker.proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "READY":
                info = json.loads(rest or "{}")
                with self.cond:
                    if worker.state == "starting":
                        worker.state, worker.warm = "warm", info
                        self.failures[worker.device] = 0
                        self.cond.notify_all()
                log.info("worker %d (%s): warm in %.2fs (%s)", worker.proc.pid, worker.device,
                         time.monotonic() - worker.started,
                         ", ".join(f"{k} {v:.2f}s" for k, v in info.get("phases", {}).items()))
            elif word == "FAILED":
                error = json.loads(rest or "{}").get("error", "unknown error")
                with self.cond:
                    self.last_error[worker.device] = error
                log.error("worker %d (%s): failed to warm up: %s", worker.proc.pid, worker.device, error)

    def _maintain(self) -> None:
        """Reap exited workers and keep ``per_device`` workers starting or warm on every device."""
        now = time.monotonic()
        for w in self.workers:
            code = w.proc.poll()
            if code is None or w.state == "exited":
                continue
            if w.state == "claimed":
                log.info("worker %d (%s): exited with code %d after serving %r for %.1fs", w.proc.pid, w.device,
                         code, w.model, now - (w.claimed_at or now))
            else:
                self.failures[w.device] += 1
                backoff = min(30.0, 2.0 ** self.failures[w.device])
                self.next_spawn[w.device] = now + backoff
                if self.last_error[w.device] is None or w.state == "warm":
                    self.last_error[w.device] = f"worker {w.proc.pid} exited with code {code} while {w.state}"
                log.error("worker %d (%s): exited with code %d while %s; next start in %.0fs", w.proc.pid, w.device,
                          code, w.state, backoff)
            w.state = "exited"
            if w.proc.stdin:
                w.proc.stdin.close()
            if os.path.exists(w.address):
                os.unlink(w.address)
        self.workers = [w for w in self.workers if w.state != "exited"]
        if self.stopping:
            return
        for device in self.devices:
            ready = sum(1 for w in self.workers if w.device == device and w.state in ("starting", "warm"))
            while ready < self.per_device and now >= self.next_spawn[device]:
                self._spawn(device)
                ready += 1

    def _maintain_loop(self) -> None:
        while True:
            with self.cond:
                if self.stopping:
                    return
                self._maintain()
                self.cond.notify_all()
                self.cond.wait(0.2)

    def claim(self, device: str, model: str, timeout: float) -> dict:
        if device != "auto" and device not in self.devices:
            return {"ok": False, "error": f"it keeps workers for {', '.join(self.devices)}, not for {device} "
                                          f"(start it with --devices naming that device)"}
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.stopping:
                warm = [w for w in self.workers if w.state == "warm" and device in ("auto", w.device)
                        and w.proc.poll() is None]
                if device == "auto":
                    warm.sort(key=lambda w: w.device == "cpu")  # GPUs first, as an in-process MODEL instance
                for w in warm:
                    try:
                        w.proc.stdin.write("claimed\n")
                        w.proc.stdin.flush()
                    except OSError:  # it just died; the maintenance loop reaps it
                        continue
                    w.state, w.model, w.claimed_at = "claimed", model, time.monotonic()
                    self.claims += 1
                    log.info("worker %d (%s): claimed by model %r", w.proc.pid, w.device, model)
                    # the replacement's warm-up (imports, CUDA context, kernels) would compete with this
                    # worker's load and first forward for the host's cores and the device: start it later
                    self.next_spawn[w.device] = max(self.next_spawn[w.device],
                                                    time.monotonic() + self.replace_delay)
                    self._maintain()
                    return {"ok": True, "worker": w.record()}
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.5))
            starting = sum(1 for w in self.workers if w.state == "starting" and device in ("auto", w.device))
            errors = {d: e for d, e in self.last_error.items() if e and device in ("auto", d)}
            why = f"; last failure: {'; '.join(f'{d}: {e}' for d, e in errors.items())}" if errors else ""
            return {"ok": False, "error": f"no warm worker for {device} within {timeout:.0f}s ({starting} starting, "
                                          f"{self.per_device} kept per device{why}; the pool's log says more)"}
        return {"ok": False, "error": "the engine pool is shutting down"}

    def status(self) -> dict:
        with self.cond:
            workers = [w.record() for w in self.workers]
            warm = {d: sum(1 for w in self.workers if w.device == d and w.state == "warm") for d in self.devices}
            return {"ok": True, "pid": os.getpid(), "socket": self.socket_path, "devices": self.devices,
                    "per_device": self.per_device, "warm": warm, "claims": self.claims,
                    "uptime_s": round(time.monotonic() - self.started, 3), "workers": workers,
                    "last_error": {d: e for d, e in self.last_error.items() if e}}

    # -- serving ----------------------------------------------------------------------------------------------
    def _handle(self, conn) -> None:
        try:
            request = conn.recv()
            op = request.get("op") if isinstance(request, dict) else None
            if op == "claim":
                timeout = float(request.get("timeout", CLAIM_TIMEOUT))
                reply = self.claim(str(request.get("device", "auto")), str(request.get("model", "?")), timeout)
            elif op in ("status", "health"):
                reply = self.status()
            else:
                reply = {"ok": False, "error": f"unknown request {op!r}; known: claim, status"}
            conn.send(reply)
        except (OSError, EOFError) as e:
            log.warning("a client went away mid-request: %s", e)
        finally:
            conn.close()

    def _prepare_socket(self) -> None:
        if os.path.exists(self.socket_path):
            try:
                pool_status(self.socket_path)
            except PoolError:
                os.unlink(self.socket_path)  # stale: a pool that died without cleaning up
            else:
                raise PoolError(f"another engine pool is already serving {self.socket_path}")
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        kp = key_path(self.socket_path)
        if kp.exists():
            kp.unlink()
        fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.key.hex())

    def serve(self) -> None:
        self._prepare_socket()
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            listener = Listener(self.socket_path, family="AF_UNIX", authkey=self.key)
        finally:
            os.umask(old_umask)
        log.info("engine pool %d listening on %s: %d warm worker(s) per device on %s", os.getpid(), self.socket_path,
                 self.per_device, ", ".join(self.devices))
        with self.cond:
            self._maintain()
        maintainer = threading.Thread(target=self._maintain_loop, name="pool-maintain", daemon=True)
        maintainer.start()
        try:
            while True:
                try:
                    conn = listener.accept()
                except AuthenticationError as e:
                    log.warning("refused a connection that failed authentication: %s", e)
                    continue
                except OSError as e:
                    log.warning("accept failed: %s", e)
                    continue
                threading.Thread(target=self._handle, args=(conn,), name="pool-client", daemon=True).start()
        finally:
            listener.close()
            self.shutdown()

    def shutdown(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            idle = [w for w in self.workers if w.state in ("starting", "warm")]
            claimed = [w for w in self.workers if w.state == "claimed" and w.proc.poll() is None]
        for w in idle:
            w.proc.terminate()
        for w in idle:
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        if claimed:
            log.info("stopping; %d claimed worker(s) keep serving their models (pids %s) and exit when those are "
                     "unloaded", len(claimed), ", ".join(str(w.proc.pid) for w in claimed))
        for path in (self.socket_path, str(key_path(self.socket_path))):
            if os.path.exists(path):
                os.unlink(path)
        if not claimed:
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)
        log.info("engine pool %d stopped", os.getpid())


def default_devices() -> str:
    return "0" if os.path.exists("/dev/nvidia0") else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tritonmoe-engine-pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="Unix socket path; models name it in their 'engine_pool' "
                                                   "parameter (the key is written beside it as <socket>.key)")
    p.add_argument("--devices", default=None,
                   help="'cpu', GPU indices '0,1', or a mix ('cuda:0,cpu'); default: GPU 0 if there is one, else cpu")
    p.add_argument("--per-device", type=int, default=1, help="warm workers kept ready per device (default 1)")
    p.add_argument("--replace-delay", type=float, default=0.0, metavar="SECONDS",
                   help="start a claimed worker's replacement this long after the claim, so its warm-up does not "
                        "compete with the claimed worker's load and first forward (default 0: at once)")
    p.add_argument("--no-kernel-warmup", action="store_true",
                   help="workers skip the tiny MoE forward that loads the GPU kernels before a claim")
    p.add_argument("--prepin-loader", metavar="URL",
                   help="workers map the DRAM-resident models of the loader at URL before a claim and, on a GPU, "
                        "page-lock them (a load of one of them then copies at the pinned PCIe rate; on a GPU, failed "
                        "after 15.7 GB page-locked on the H200 VM: see docs/loader.md)")
    p.add_argument("--status", action="store_true", help="print the running pool's status as JSON and exit")
    a = p.parse_args(argv)
    if a.status:
        try:
            print(json.dumps(pool_status(a.socket), indent=1))
            return 0
        except PoolError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if a.per_device < 1:
        p.error("--per-device must be >= 1")
    if a.replace_delay < 0:
        p.error("--replace-delay must be >= 0")
    try:
        devices = parse_devices(a.devices or default_devices())
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [engine-pool] %(levelname)s %(message)s")
    if a.prepin_loader and any(str(d).startswith("cuda") for d in devices):
        log.warning("--prepin-loader with a GPU device: on the H200 VM a worker that page-locked a 15.7 GB DRAM copy "
                    "copied it at 52 GB/s but its CUDA context then failed the first forward (docs/loader.md); "
                    "use it with small models, or leave it off")

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        pool = EnginePool(a.socket, devices, a.per_device, replace_delay=a.replace_delay,
                          worker_args=(["--no-kernel-warmup"] if a.no_kernel_warmup else [])
                          + (["--prepin-loader", a.prepin_loader] if a.prepin_loader else []))
        pool.serve()
    except KeyboardInterrupt:
        return 0
    except PoolError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
