"""The main job: serve a MoE model through a real Triton server and stream a completion from it.

With no arguments it builds the default tiny MoE (random weights, local tokenizer) on first use, starts
``tritonserver`` over the bundled model repository on loopback, loads the model through the repository API,
streams a completion for a sample prompt and prints it with timings. ``--serve`` keeps serving until Ctrl-C.
``--loader`` also starts a per-host loader service and loads the model's weights through its DRAM cache, from the
checkpoint converted once into the loading-optimised format. ``--pool`` also starts a warm engine pool
(``tritonmoe-engine-pool``) beside the server and runs the model's engine in one of its pre-started workers
(config parameter ``engine_pool``); with ``--loader`` too, that is the fast-start path.
``--router N`` is the multi-server mode: N tritonservers on loopback (empty repositories, explicit model control)
behind the router (``python -m tritonmoe.router``), which deploys the model, loads it where it starts soonest on
the first request, and streams the completion back; ``--loader`` and ``--pool`` then serve every server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import tiny_models
from .client import GenerateError, generate_stream, load_model
from .model_config import read_config, with_overrides
from .tritonserver import TritonError, TritonServer, free_port, tritonmoe_home

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "def fibonacci(n):\n    "


def ensure_default_model(arch: str) -> Path:
    from tritonmoe.backend.config import models_home

    out = models_home() / f"tiny-{arch.replace('_', '-')}"
    return tiny_models.build(tiny_models.TinySpec(arch=arch, layers=2), out)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tritonmoe-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--model", default="tiny_moe", help="model folder in the repository (default: tiny_moe)")
    p.add_argument("--checkpoint", help="HF checkpoint folder to serve instead of the model's configured one")
    p.add_argument("--arch", default="mixtral", choices=tiny_models.ARCHITECTURES,
                   help="architecture of the default tiny model built on first use")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="KIND_CPU or KIND_GPU instance")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--serve", action="store_true", help="keep serving after the sample completion until Ctrl-C")
    p.add_argument("--log", type=Path, help="server log file (default: a temporary file)")
    p.add_argument("--loader", action="store_true",
                   help="start a loader service and load the weights through its DRAM cache (the checkpoint is "
                        "converted once under $TRITONMOE_HOME/converted)")
    p.add_argument("--loader-dram-budget", default="8GiB", help="DRAM cache of that loader (default 8GiB)")
    p.add_argument("--pool", action="store_true",
                   help="start a warm engine pool beside the server and run the engine in one of its workers "
                        "(the model's stub then never imports torch)")
    p.add_argument("--pool-per-device", type=int, default=1, help="warm workers the pool keeps (default 1)")
    p.add_argument("--router", type=int, default=0, metavar="N",
                   help="multi-server mode: N tritonservers behind the router, which loads the model on the first "
                        "request; the completion streams through the router")
    p.add_argument("--router-port", type=int, default=8080, help="--router: the router's port (default 8080)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config.pbtxt parameter, repeatable (e.g. --param expert_cache_budget=25%%)")
    a = p.parse_args(argv)
    if a.router < 0:
        p.error("--router takes the number of tritonservers (>= 1)")
    for item in a.param:
        if "=" not in item or not item.partition("=")[0].strip():
            p.error(f"--param expects KEY=VALUE, got {item!r}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    overrides = {k.strip(): v for k, _, v in (item.partition("=") for item in a.param)}
    if a.checkpoint:
        overrides["checkpoint"] = str(Path(a.checkpoint).resolve())
    else:
        t = time.perf_counter()
        path = ensure_default_model(a.arch)
        overrides["checkpoint"] = str(path)
        say(f"model checkpoint: {path} ({time.perf_counter() - t:.2f}s)")
    model_dir = a.model_repository / a.model
    if not (model_dir / "config.pbtxt").exists():
        say(f"error: no model '{a.model}' in {a.model_repository}")
        return 2
    config = with_overrides(read_config(model_dir), parameters=overrides,
                            kind="KIND_GPU" if a.device == "gpu" else "KIND_CPU")

    server = TritonServer(a.model_repository, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port,
                          metrics_port=a.metrics_port, log_path=a.log)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    loader = pool = url = None
    try:
        if a.pool:
            t = time.perf_counter()
            pool = spawn_pool("cpu" if a.device == "cpu" else "0", tritonmoe_home() / "engine-pool.log",
                              per_device=a.pool_per_device)
            say(f"engine pool up at {pool.socket} ({a.pool_per_device} warm worker(s) on "
                f"{'cpu' if a.device == 'cpu' else 'GPU 0'} in {time.perf_counter() - t:.1f}s; log "
                f"{pool.log_path})")
            overrides["engine_pool"] = pool.socket
            config = with_overrides(config, parameters=overrides)
        if overrides.get("expert_host_tier", "").strip().lower() == "disk" and not a.loader:
            # the disk tier serves the experts from a converted checkpoint's files
            overrides["checkpoint"] = str(ensure_converted(Path(overrides["checkpoint"]), say))
            config = with_overrides(config, parameters=overrides)
        if a.loader:
            loader, url, converted = start_loader(Path(overrides["checkpoint"]), a.loader_dram_budget, say)
            overrides.update(checkpoint=str(converted), loader_url=url)
            config = with_overrides(config, parameters=overrides)
        if a.router:
            return serve_through_router(a, overrides, loader_url=url if a.loader else None,
                                        pool_socket=pool.socket if pool is not None else None, stop=stop, say=say)
        t = time.perf_counter()
        server.start()
        say(f"tritonserver up in {time.perf_counter() - t:.1f}s  HTTP {server.http_url}  gRPC {server.grpc_url}  "
            f"metrics {server.metrics_url}  (log: {server.log_path})")
        t = time.perf_counter()
        load_model(server.http_url, a.model, config)
        say(f"model '{a.model}' loaded in {time.perf_counter() - t:.2f}s ({a.device})")
        stream_sample(server.http_url, a, say)
        if a.serve:
            say(f"\nserving '{a.model}' until Ctrl-C: curl -X POST http://{server.http_url}/v2/models/{a.model}"
                "/generate -d '{\"text_input\": \"def \", \"parameters\": {\"max_tokens\": 16}}'")
            while not stop.wait(0.5):
                if server.proc.poll() is not None:
                    say(f"tritonserver exited with code {server.proc.returncode}")
                    return 1
        return 0
    except KeyboardInterrupt:
        return 130
    except (TritonError, GenerateError) as e:
        say(f"error: {e}")
        return 1
    except Exception as e:  # tritonclient raises InferenceServerException for a failed load
        say(f"error: {type(e).__name__}: {e}")
        return 1
    finally:
        if not a.router:
            say("stopping tritonserver ...")
            server.stop()
        if loader is not None:
            loader.terminate()
            loader.wait(30)
            shutil.rmtree(loader.shm_dir, ignore_errors=True)  # this job's DRAM cache: host memory, not disk
        if pool is not None:
            stop_pool(pool)


def stream_sample(http_url: str, a, say) -> None:
    """Stream the sample completion from ``http_url`` (a tritonserver or the router) and print it with timings."""
    say(f"\nprompt: {a.prompt!r}\n")
    start, first, count, reason = time.perf_counter(), None, 0, "?"
    for event in generate_stream(http_url, a.model, a.prompt, max_tokens=a.max_tokens, temperature=a.temperature):
        first = first or time.perf_counter()
        count = event["num_output_tokens"]
        reason = event["finish_reason"] or reason
        sys.stdout.write(event["text_output"])
        sys.stdout.flush()
    end = time.perf_counter()
    decode = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
    say(f"\n\nfinish reason: {reason}; {count} tokens; time to first token {1000 * (first - start):.1f} ms; "
        f"{decode:.1f} tokens/s after the first; total {end - start:.2f}s")


def serve_through_router(a, overrides: dict, loader_url: str | None, pool_socket: str | None,
                         stop: threading.Event, say) -> int:
    """--router N: start N tritonservers and the router over them (a hosts file naming them, the loader and the
    pool), stream the sample through the router (the first request loads the model), then stop everything."""
    import tempfile
    import urllib.request

    from tritonmoe.router.config import RESERVED_PARAMS

    import socket

    with socket.socket() as probe:  # fail now, not after the servers started and the router died
        try:
            probe.bind((a.host, a.router_port))
        except OSError:
            raise TritonError(f"router port {a.router_port} on {a.host} is already in use (--router-port)") from None
    work = Path(tempfile.mkdtemp(prefix="tritonmoe-main-router-"))
    servers = [TritonServer(work / f"repo{i}", host="127.0.0.1", log_path=work / f"server{i}.log",
                            extra_args=["--disable-auto-complete-config"]) for i in range(a.router)]
    router = None
    try:
        for s in servers:
            s.model_repository.mkdir(parents=True)
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(servers)) as ex:
            list(ex.map(lambda s: s.start(timeout=180), servers))
        say(f"{len(servers)} tritonservers up in {time.perf_counter() - t:.1f}s (logs: {work}/server*.log)")
        hosts = []
        for i, s in enumerate(servers):
            h = {"name": f"h{i}", "http": s.http_url, "grpc": s.grpc_url, "metrics": s.metrics_url,
                 "device": "gpu:0" if a.device == "gpu" else "cpu"}
            if loader_url:
                h["loader"] = loader_url
            if pool_socket:
                h["engine_pool"] = pool_socket
            hosts.append(h)
        model = {"checkpoint": overrides["checkpoint"], "use_loader": bool(loader_url),
                 "parameters": {k: v for k, v in overrides.items() if k not in RESERVED_PARAMS}}
        cfg = work / "hosts.json"
        cfg.write_text(json.dumps({"hosts": hosts, "models": {a.model: model},
                                   "listen": {"host": a.host, "port": a.router_port}}, indent=1))
        with open(work / "router.log", "ab") as log_file:
            router = subprocess.Popen([sys.executable, "-m", "tritonmoe.router", "--config", str(cfg)],
                                      stdout=log_file, stderr=subprocess.STDOUT)
        url, deadline = f"{a.host}:{a.router_port}", time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://{url}/health", timeout=2).close()
                break
            except OSError:
                if router.poll() is not None or time.monotonic() > deadline:
                    raise TritonError(f"the router did not start (log: {work / 'router.log'}):\n"
                                      + (work / "router.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        say(f"router up at http://{url} over {len(servers)} servers (hosts file {cfg}; log {work / 'router.log'}); "
            f"model '{a.model}' deployed, loads on the first request")
        stream_sample(url, a, say)
        with urllib.request.urlopen(f"http://{url}/admin/models", timeout=10) as r:
            where = next(m["instances"] for m in json.load(r)["models"] if m["name"] == a.model)
        say(f"served by {', '.join(where) or 'no instance left'} (of {', '.join(h['name'] for h in hosts)})")
        if a.serve:
            say(f"\nrouting '{a.model}' until Ctrl-C: curl -X POST http://{url}/v1/completions -H "
                f"'Content-Type: application/json' -d '{{\"model\": \"{a.model}\", \"prompt\": \"def \", "
                f"\"max_tokens\": 16}}'")
            while not stop.wait(0.5):
                if router.poll() is not None:
                    say(f"the router exited with code {router.returncode}")
                    return 1
        return 0
    finally:
        say("stopping the router and its tritonservers ...")
        if router is not None and router.poll() is None:
            router.terminate()
            try:
                router.wait(30)
            except subprocess.TimeoutExpired:
                router.kill()
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


def ensure_converted(checkpoint: Path, say) -> Path:
    """``checkpoint`` in the loading-optimised format, converted once under $TRITONMOE_HOME/converted (a no-op when
    already done, or when ``checkpoint`` is converted already)."""
    from tritonmoe.backend.weights import is_converted
    from tritonmoe.loader.convert import convert

    if is_converted(checkpoint):
        return checkpoint
    t = time.perf_counter()
    converted = convert(checkpoint, tritonmoe_home() / "converted" / checkpoint.name, progress=False).dest
    say(f"converted checkpoint: {converted} ({time.perf_counter() - t:.2f}s)")
    return converted


def start_loader(checkpoint: Path, dram_budget: str, say) -> tuple[subprocess.Popen, str, Path]:
    """Convert ``checkpoint`` once (a no-op when already done), start a loader service on a free loopback port and
    wait until it answers. Returns the process (``.shm_dir``: its DRAM cache), its URL and the converted folder."""
    converted = ensure_converted(checkpoint, say)
    root = tritonmoe_home() / "loader"
    proc, url = spawn_loader(root, Path("/dev/shm") / f"tritonmoe-main-loader-{os.getuid()}", dram_budget)
    say(f"loader service up at {url} (DRAM budget {dram_budget}; log {root / 'service.log'})")
    return proc, url, converted


def spawn_loader(root: Path, shm_dir: Path, dram_budget: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """A loader service process on a free loopback port (log: ``root/service.log``), once it answers."""
    from tritonmoe.loader.client import LoaderClient, LoaderError

    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "service.log", "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "tritonmoe.loader.service", "--root", str(root), "--port",
                                 str(port), "--shm-dir", str(shm_dir), "--dram-budget", str(dram_budget),
                                 "--disk-budget", "1GiB"], stdout=subprocess.DEVNULL, stderr=log_file)
    proc.shm_dir = shm_dir  # the caller removes it once the process is gone
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while True:
        try:
            LoaderClient(url, timeout=5).health()
            return proc, url
        except LoaderError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise TritonError(f"the loader service did not start (log: {root / 'service.log'})") from None
            time.sleep(0.2)


def spawn_pool(devices: str, log_path: Path, per_device: int = 1, timeout: float = 600,
               extra_args: list[str] | None = None) -> subprocess.Popen:
    """An engine pool process (``--devices devices``) on a fresh socket, once its workers are warm. The process has
    ``.socket`` and ``.log_path``; :func:`stop_pool` ends it and removes its folder."""
    import tempfile

    from tritonmoe.backend.engine_pool import PoolError, parse_devices, pool_status

    folder = Path(tempfile.mkdtemp(prefix="tritonmoe-pool-"))
    socket_path = folder / "pool.sock"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "tritonmoe.backend.engine_pool", "--socket", str(socket_path),
                                 "--devices", devices, "--per-device", str(per_device), *(extra_args or [])],
                                stdout=subprocess.DEVNULL, stderr=log_file)
    proc.socket, proc.log_path, proc.folder = str(socket_path), log_path, folder
    want, deadline = per_device * len(parse_devices(devices)), time.monotonic() + timeout
    while True:
        try:
            if sum(pool_status(proc.socket)["warm"].values()) >= want:
                return proc
        except PoolError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_pool(proc)
            raise TritonError(f"the engine pool did not get warm (log: {log_path})")
        time.sleep(0.2)


def stop_pool(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(proc.folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
