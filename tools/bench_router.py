"""Benchmark the router's placement policies on a serverless workload over real Triton servers.

    python -m tritonmoe.tools.bench_router [--models 8] [--servers 3] [--requests 60] [--mean-gap 1.5] [--cv 4]
        [--keep-alive 6] [--max-models 2] [--max-tokens 16] [--policies locality,random,round_robin]
        [--device cpu|gpu] [--model-gb 0] [--loader] [--pool] [--per-device 2] [--workdir DIR]
        [--out docs/results/router_bench.json] [--plot docs/figures/router_bench.png]

CPU (default): tiny models of six architectures, one tritonserver per ``--servers``. GPU (``--device gpu``): one
tritonserver per GPU, models on ``KIND_GPU`` instances of that server's GPU. ``--model-gb G`` builds Mixtral-shaped
random bf16 checkpoints of about G GB each instead of tiny ones (on the GPU when there is one: seconds per model).
``--loader`` converts the checkpoints to the loading-optimised format and serves them through one loader service
for the machine (every server loads through it, as the servers of one host share its DRAM cache); each policy
run starts with every checkpoint in its DRAM cache (the budget holds them all), so runs differ only in placement.
The policy ``locality+migration`` is locality with ``placement_migration``.
``--pool`` starts one warm engine pool for the machine (``tritonmoe-engine-pool --devices cpu`` or ``0,1,...`` on
GPU, ``--per-device`` warm workers per device) and names it as every host's ``engine_pool``: each cold start then
claims a pre-started worker (torch, transformers, CUDA context loaded) instead of a stub importing them. Every policy
run (and the warm-up) starts with the pool at its warm count.

One trace (Gamma inter-arrivals with the given coefficient of variation, Zipf-skewed model popularity) is replayed
against each policy with the same servers, every policy starting with nothing loaded. Each server holds at most
``--max-models`` models (the stand-in for GPU memory), so the baselines' cold starts evict one another; the
keep-alive expires between bursts. Per request the client measures time to first token and end-to-end latency
(streaming through the router's generate_stream); the router reports cold starts (by tier) and instance-seconds
(the "GPU-seconds" the models held).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np

from tritonmoe.router.config import RouterConfig
from tritonmoe.router.harness import RouterThread, stream
from tritonmoe.tools import tiny_models
from tritonmoe.tools.tritonserver import TritonServer, tritonmoe_home

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3"]


def big_spec(gb: float, seed: int) -> tiny_models.TinySpec:
    """A Mixtral-style bf16 shape of about ``gb`` GB: hidden 2048, 16 experts of FFN 4096 (0.83 GB per layer)."""
    per_layer = 16 * 3 * 2048 * 4096 * 2 + 4 * 2048 * 2048 * 2
    return tiny_models.TinySpec(arch="mixtral", layers=max(1, round(gb * 1e9 / per_layer)), hidden=2048, heads=16,
                                kv_heads=4, experts=16, expert_ffn=4096, dtype="bfloat16", seed=seed,
                                shard_mb=4096)


def build_models(n: int, gb: float = 0.0, device: str = "cpu") -> list[Path]:
    out = []
    for i in range(n):
        if gb > 0:
            dest = tritonmoe_home() / "models" / f"bench-router-{i}-{gb:g}gb"
            tiny_models.build(big_spec(gb, i), dest, overwrite=True, device=device)
        else:
            arch = ARCHS[i % len(ARCHS)]
            dest = tritonmoe_home() / "models" / f"bench-router-{i}-{arch}"
            if not (dest / "config.json").exists():
                tiny_models.build(tiny_models.TinySpec(arch=arch, layers=2, seed=i), dest, overwrite=True)
        out.append(dest)
    return out


def start_loader(checkpoints: list[Path], work: Path, say) -> tuple:
    """Convert the checkpoints and serve them through one loader service with all of them in its DRAM cache:
    (process, url, converted paths)."""
    from tritonmoe.loader.client import LoaderClient
    from tritonmoe.loader.convert import convert
    from tritonmoe.router.state import checkpoint_bytes
    from tritonmoe.tools.serve import spawn_loader

    converted = []
    for i, c in enumerate(checkpoints):
        t = time.perf_counter()
        converted.append(convert(c, work / "converted" / f"m{i}", progress=False).dest)
        say(f"converted m{i}: {checkpoint_bytes(str(converted[-1])) / 1e9:.2f} GB in {time.perf_counter() - t:.1f}s")
    budget = int(sum(checkpoint_bytes(str(c)) for c in converted) * 1.1) + (1 << 30)
    shm = Path("/dev/shm") / f"tritonmoe-bench-router-{os.getpid()}"
    proc, url = spawn_loader(work / "loader", shm, str(budget))
    client = LoaderClient(url)
    t = time.perf_counter()
    for i, c in enumerate(converted):
        client.register(f"m{i}", c)
        client.load(f"m{i}")
    say(f"loader {url}: {len(converted)} checkpoints in its DRAM cache ({time.perf_counter() - t:.1f}s)")
    return proc, url, converted


def start_pool(devices: str, per_device: int, work: Path, say) -> tuple:
    """One warm engine pool for the machine: (process, socket path), once every device has its warm workers."""
    from tritonmoe.tools.serve import spawn_pool

    t = time.perf_counter()
    proc = spawn_pool(devices, work / "pool.log", per_device)
    say(f"engine pool {proc.socket}: {per_device} warm worker(s) per device on {devices} "
        f"({time.perf_counter() - t:.1f}s)")
    return proc, proc.socket


def wait_pool_warm(proc, socket_path: str, log: Path, timeout: float = 120, unclaimed: bool = False) -> dict:
    """Until every device of the pool has its warm count (and, with ``unclaimed``, no worker is claimed)."""
    from tritonmoe.backend.engine_pool import PoolError, pool_status

    deadline, s = time.monotonic() + timeout, None
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine pool exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            s = pool_status(socket_path)
            if (all(n == s["per_device"] for n in s["warm"].values())
                    and not (unclaimed and any(w["state"] == "claimed" for w in s["workers"]))):
                return s
        except PoolError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine pool did not get warm in {timeout:.0f}s: {s}\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def release_pool(proc, socket_path: str, log: Path, servers) -> dict:
    """After unload_all: every device back at its warm count. A worker still claimed belongs to a model whose
    unload Triton did not finish (seen on the CPU machine, with and without the pool: the model leaves
    /v2/models/stats, its stub stays alive); one more unload request per server is tried, then it is reported."""
    from tritonmoe.backend.engine_pool import pool_status

    status = wait_pool_warm(proc, socket_path, log)
    claimed = {w["model"] for w in status["workers"] if w["state"] == "claimed"}
    for name in claimed:
        for s in servers:
            req = urllib.request.Request(f"http://{s.http_url}/v2/repository/models/{name}/unload", data=b"{}")
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except OSError:
                pass
    if claimed:
        try:
            return wait_pool_warm(proc, socket_path, log, timeout=15, unclaimed=True)
        except RuntimeError:
            return pool_status(socket_path)
    return status


def make_trace(n: int, models: int, mean_gap: float, cv: float, seed: int, zipf: float = 1.1):
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)  # Gamma CV = 1/sqrt(shape)
    gaps = rng.gamma(shape, mean_gap / shape, size=n)
    weights = 1.0 / np.arange(1, models + 1) ** zipf
    picks = rng.choice(models, size=n, p=weights / weights.sum())
    t = np.cumsum(gaps) - gaps[0]
    return [(float(t[i]), int(picks[i])) for i in range(n)]


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def unload_all(servers):
    for s in servers:
        with urllib.request.urlopen(f"http://{s.http_url}/v2/models/stats", timeout=10) as r:
            names = [m["name"] for m in json.loads(r.read())["model_stats"]]
        print(f"unload_all: {s.http_url} has {names}", flush=True)
        for name in names:
            req = urllib.request.Request(f"http://{s.http_url}/v2/repository/models/{name}/unload", data=b"{}")
            urllib.request.urlopen(req, timeout=60).read()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = 0
        for s in servers:
            with urllib.request.urlopen(f"http://{s.http_url}/v2/models/stats", timeout=10) as r:
                busy += len(json.loads(r.read())["model_stats"])
        if not busy:
            return
        time.sleep(0.5)
    left = {}
    for s in servers:
        with urllib.request.urlopen(f"http://{s.http_url}/v2/models/stats", timeout=10) as r:
            left[s.http_url] = [m["name"] for m in json.loads(r.read())["model_stats"]]
    print(f"unload_all: models still loaded after 60s: {left}", flush=True)


def run_policy(policy, servers, checkpoints, trace, args, loader_url=None, gpus=0, pool_socket=None):
    hosts = [{"name": f"h{i}", "http": s.http_url, "grpc": s.grpc_url, "metrics": s.metrics_url,
              "max_models": args.max_models} for i, s in enumerate(servers)]
    for i, h in enumerate(hosts):
        if loader_url:
            h["loader"] = loader_url
        if pool_socket:
            h["engine_pool"] = pool_socket  # one pool for the machine: every server's host entry names it
        if gpus:
            h["device"] = f"gpu:{i % gpus}"
    models = {f"m{i}": {"checkpoint": str(c), "keep_alive_s": args.keep_alive, "max_instances": 2,
                        "target_concurrency": 4, "use_loader": bool(loader_url)} for i, c in enumerate(checkpoints)}
    base_policy, _, variant = policy.partition("+")
    cfg = RouterConfig.parse({"hosts": hosts, "models": models, "policy": base_policy, "listen": {"port": 0},
                              "poll_interval_s": 0.5, "first_token_timeout_s": 120, "load_timeout_s": 300,
                              "placement_migration": variant == "migration"})
    results = [None] * len(trace)
    with RouterThread(cfg, policy_seed=args.seed) as router:
        t_start = time.monotonic()

        def one(i):
            at, m = trace[i]
            delay = t_start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.monotonic()
            ttft, n, err = None, 0, None
            try:
                for ev in stream(router.url + f"/v2/models/m{m}/generate_stream",
                                 {"text_input": f"request {i}: def f(x):", "stream": True,
                                  "parameters": {"max_tokens": args.max_tokens, "ignore_eos": True}}, timeout=600):
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    n += len(ev["output_token_ids"])
            except Exception as e:  # noqa: BLE001 - counted, reported
                err = str(e)
            results[i] = {"model": m, "at": at, "ttft": ttft, "e2e": time.monotonic() - t0, "tokens": n,
                          "error": err}

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(one, range(len(trace))))
        wall = time.monotonic() - t_start
        mgr = router.router.manager
        cold = list(mgr.cold_starts)
        decisions = list(mgr.placement_log)
        gpu_s = router.call(_loaded_seconds(mgr))
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    tiers = {}
    for c in cold:
        tiers[c["tier"]] = tiers.get(c["tier"], 0) + 1
    errors = sorted({r["error"] for r in results if r["error"]})
    return {"policy": policy, "requests": len(results), "errors": len(results) - len(ok), "error_kinds": errors[:5],
            "ttft_mean": statistics.fmean(ttft) if ttft else None, "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99), "e2e_mean": statistics.fmean(e2e) if e2e else None,
            "e2e_p99": percentile(e2e, 99), "cold_starts": len(cold), "cold_starts_by_tier": tiers,
            "mean_load_s": statistics.fmean([c["seconds"] for c in cold]) if cold else 0.0,
            "instance_seconds": gpu_s, "wall_s": wall, "placement_decisions": decisions, "per_request": results}


async def _loaded_seconds(mgr):
    return mgr.loaded_seconds()


def measure_stall(args, checkpoint: Path) -> dict:
    """Migration stall: the router-side longest pause between a stream's deltas, for the same 400-token greedy
    stream unmigrated and migrated at token 100 (two servers, both holding the model)."""
    sysconfig.get_config_vars()
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-stall-"))
    servers = []
    for i in range(2):
        (tmp / f"repo{i}").mkdir()
        servers.append(TritonServer(tmp / f"repo{i}", log_path=tmp / f"server{i}.log",
                                   extra_args=["--disable-auto-complete-config"]))
    res = {"plain_max_gap_s": [], "migrated_max_gap_s": [], "warmup_s": [], "regenerated_tokens": [], "rounds": []}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(timeout=120), servers))
        hosts = [{"name": f"h{i}", "http": s.http_url, "grpc": s.grpc_url} for i, s in enumerate(servers)]
        cfg = RouterConfig.parse({"hosts": hosts, "listen": {"port": 0}, "models": {
            "g": {"checkpoint": str(checkpoint), "min_instances": 2, "max_instances": 2}}})
        with RouterThread(cfg) as router:
            deadline = time.monotonic() + 300
            while sum(1 for h in router.router.hosts if h.ready_instance("g")) < 2:
                assert time.monotonic() < deadline, "model did not load"
                time.sleep(0.2)
            for _ in range(args.stall_runs):
                for kind in ("plain", "migrated"):
                    rid = {}

                    def opened(headers, kind=kind):
                        rid["id"] = headers["X-Request-Id"]
                        if kind == "migrated":
                            from tritonmoe.router.harness import call
                            call(router.url + f"/admin/requests/{rid['id']}/migrate", {"at_token": 100})

                    for _ev in stream(router.url + "/v2/models/g/generate_stream",
                                      {"text_input": "class A(object):", "stream": True,
                                       "parameters": {"max_tokens": 400, "ignore_eos": True}}, on_open=opened):
                        pass
                    info = next(x for x in router.router.finished if x["id"] == rid["id"])
                    res[f"{kind}_max_gap_s"].append(info["max_gap_s"])
                    if kind == "migrated" and info["migration_log"] and "warmup_s" in info["migration_log"][0]:
                        m = info["migration_log"][0]
                        res["warmup_s"].append(m["warmup_s"])
                        res["regenerated_tokens"].append(m["handover_token"] - m["dest_token"])
                        res["rounds"].append(m["rounds"])
    finally:
        for s in servers:
            s.stop()
    summary = {k: {"median": statistics.median(v), "max": max(v), "n": len(v)} for k, v in res.items() if v}
    summary["added_stall_median_s"] = summary["migrated_max_gap_s"]["median"] - summary["plain_max_gap_s"]["median"]
    return {"summary": summary, "raw": res}


def plot(summary, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    names = [r["policy"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(len(names))
    for ax, (key_mean, key_p99, title) in zip(axes[:2], [("ttft_mean", "ttft_p99", "time to first token (s)"),
                                                         ("e2e_mean", "e2e_p99", "end-to-end latency (s)")]):
        ax.bar(x - 0.2, [r[key_mean] for r in runs], 0.4, label="mean")
        ax.bar(x + 0.2, [r[key_p99] for r in runs], 0.4, label="P99")
        ax.set_xticks(x, names)
        ax.set_title(title)
        ax.legend()
    axes[2].bar(x - 0.2, [r["cold_starts"] for r in runs], 0.4, label="cold starts")
    axes[2].bar(x + 0.2, [r["instance_seconds"] / 60 for r in runs], 0.4, label="instance-minutes")
    axes[2].set_xticks(x, names)
    axes[2].set_title("cold starts and instance time")
    axes[2].legend()
    tr = summary["trace"]
    what = (f"{tr.get('device', 'cpu').upper()}, " + (f"{tr['model_gb']:g} GB models" if tr.get("model_gb")
                                                       else "tiny models") + (", loader" if tr.get("loader") else ""))
    what += ", warm engine pool" if tr.get("pool") else ""
    fig.suptitle(f"router placement, {tr['requests']} requests over {tr['models']} models, {tr['servers']} Triton "
                 f"servers ({what}), Gamma CV {tr['cv']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_summary(runs, args, command, machine, date, gaps, final=False) -> dict:
    """The results so far as JSON (written after every policy, so a run cut short keeps what it measured)."""
    base = {r["policy"]: r for r in runs}
    summary = {"command": command, "machine": machine, "date": date,
               "trace": {"requests": args.requests, "models": args.models, "servers": args.servers,
                         "cv": args.cv, "mean_gap_s": args.mean_gap, "keep_alive_s": args.keep_alive,
                         "max_models_per_server": args.max_models, "max_tokens": args.max_tokens,
                         "device": args.device, "model_gb": args.model_gb, "loader": args.loader,
                         "pool": args.pool, "pool_per_device": args.per_device if args.pool else None,
                         "measured_cv": float(gaps.std() / gaps.mean())},
               "runs": runs}
    if "locality" in base and base["locality"]["ttft_mean"]:
        loc = base["locality"]
        summary["ratios"] = {other: {"ttft_mean": base[other]["ttft_mean"] / loc["ttft_mean"],
                                     "e2e_mean": base[other]["e2e_mean"] / loc["e2e_mean"],
                                     "ttft_p99": base[other]["ttft_p99"] / loc["ttft_p99"]}
                             for other in base if other != "locality" and base[other]["ttft_mean"]}
        for other, ratio in summary["ratios"].items() if final else ():
            print(f"{other} / locality: mean TTFT x{ratio['ttft_mean']:.1f}, mean E2E x{ratio['e2e_mean']:.1f}, "
                  f"P99 TTFT x{ratio['ttft_p99']:.1f}")
    summary["complete"] = final
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--mean-gap", type=float, default=1.5, help="mean seconds between arrivals")
    p.add_argument("--cv", type=float, default=4.0, help="coefficient of variation of inter-arrival times")
    p.add_argument("--keep-alive", type=float, default=6.0)
    p.add_argument("--max-models", type=int, default=2, help="models one server holds at once")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default="locality,random,round_robin")
    p.add_argument("--out", type=Path, default=Path("docs/results/router_bench.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/figures/router_bench.png"))
    p.add_argument("--stall-runs", type=int, default=0,
                   help="instead of the workload: measure migration stall over this many stream pairs")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: one server per GPU (--servers defaults to the GPU count), KIND_GPU instances")
    p.add_argument("--model-gb", type=float, default=0.0,
                   help="build random Mixtral-shaped bf16 checkpoints of about this size (0: tiny models)")
    p.add_argument("--loader", action="store_true",
                   help="serve converted checkpoints through one loader service (all in its DRAM cache)")
    p.add_argument("--pool", action="store_true",
                   help="start one warm engine pool for the machine (the servers' devices) and set it as every "
                        "host's engine_pool: cold starts claim pre-started engine workers")
    p.add_argument("--per-device", type=int, default=2, help="--pool: warm workers per device (default 2)")
    p.add_argument("--workdir", type=Path, help="converted checkpoints, loader state, server logs (default: temp)")
    args = p.parse_args(argv)
    gpus = 0
    if args.device == "gpu":
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            p.error("--device gpu: no GPU visible")
        if "--servers" not in (argv if argv is not None else sys.argv[1:]):
            args.servers = gpus

    command = "python -m tritonmoe.tools.bench_router " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    if gpus:
        import torch

        machine += f", {gpus} x {torch.cuda.get_device_name(0)}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"command: {command}\nmachine: {machine}\ndate:    {date}", flush=True)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    t = time.perf_counter()
    checkpoints = build_models(args.models, args.model_gb, "cuda" if gpus else "cpu")
    say(f"checkpoints: {args.models} in {time.perf_counter() - t:.1f}s")
    if args.stall_runs:
        out = measure_stall(args, checkpoints[0])
        out.update(command=command, machine=machine, date=date)
        print(json.dumps(out["summary"], indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
        return 0
    trace = make_trace(args.requests, args.models, args.mean_gap, args.cv, args.seed)
    gaps = np.diff([t for t, _ in trace])
    print(f"trace: {len(trace)} requests over {trace[-1][0]:.0f}s, inter-arrival CV {gaps.std() / gaps.mean():.2f}, "
          f"per model {np.bincount([m for _, m in trace], minlength=args.models).tolist()}", flush=True)
    tmp = args.workdir or Path(tempfile.mkdtemp(prefix="bench-router-"))
    tmp.mkdir(parents=True, exist_ok=True)
    import logging

    handler = logging.FileHandler(tmp / "router.log")  # the router's decisions: loads, unloads, placements
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("tritonmoe.router").addHandler(handler)
    logging.getLogger("tritonmoe.router").setLevel(logging.INFO)
    loader = loader_url = pool_proc = pool_socket = None
    if args.loader:
        loader, loader_url, checkpoints = start_loader(checkpoints, tmp, say)
    if args.pool:
        pool_proc, pool_socket = start_pool(",".join(str(g) for g in range(gpus)) if gpus else "cpu", args.per_device,
                                       tmp, say)
    # sysconfig fills its variables lazily and not thread-safely: a first call racing in several threads can
    # return LIBDIR None, and a server started without libpython on LD_LIBRARY_PATH fails every model load
    sysconfig.get_config_vars()
    servers = []
    for i in range(args.servers):
        (tmp / f"repo{i}").mkdir(exist_ok=True)
        servers.append(TritonServer(tmp / f"repo{i}", log_path=tmp / f"server{i}.log",
                                   extra_args=["--disable-auto-complete-config"]))
    runs = []
    try:
        with concurrent.futures.ThreadPoolExecutor(args.servers) as pool:
            list(pool.map(lambda s: s.start(timeout=120), servers))
        # warm-up, not measured: one load per server, so that the first policy does not pay what only a machine's
        # first loads cost (imports from a cold page cache, first CUDA initialisations)
        t = time.perf_counter()
        unload_all(servers)
        run_policy("round_robin", servers, checkpoints, [(0.0, i % args.models) for i in range(args.servers)], args,
                   loader_url, gpus, pool_socket)
        say(f"warm-up: one load per server ({time.perf_counter() - t:.1f}s)")
        for policy in args.policies.split(","):
            unload_all(servers)
            if pool_proc is not None:
                t = time.perf_counter()
                status = release_pool(pool_proc, pool_socket, tmp / "pool.log", servers)
                stuck = [(w["pid"], w["model"]) for w in status["workers"] if w["state"] == "claimed"]
                say(f"engine pool back at its warm count ({time.perf_counter() - t:.1f}s)" +
                    (f"; still claimed (their Triton unload did not finish): {stuck}" if stuck else ""))
            print(f"--- {policy}", flush=True)
            r = run_policy(policy, servers, checkpoints, trace, args, loader_url, gpus, pool_socket)
            runs.append(r)
            write_summary(runs, args, command, machine, date, gaps)
            f2 = lambda v: "n/a" if v is None or v != v else f"{v:.2f}"  # noqa: E731
            print(f"{policy:12s} TTFT mean {f2(r['ttft_mean'])}s p99 {f2(r['ttft_p99'])}s | E2E mean "
                  f"{f2(r['e2e_mean'])}s p99 {f2(r['e2e_p99'])}s | cold starts {r['cold_starts']} "
                  f"{r['cold_starts_by_tier']} (mean load {r['mean_load_s']:.1f}s) | instance-s "
                  f"{r['instance_seconds']:.0f} | placement migrations "
                  f"{sum(d['decision'] == 'migrate' for d in r['placement_decisions'])} | errors {r['errors']} "
                  f"{r['error_kinds']}", flush=True)
    finally:
        for s in servers:
            s.stop()
        if pool_proc is not None:
            from tritonmoe.tools.serve import stop_pool

            stop_pool(pool_proc)
        if loader is not None:
            loader.terminate()
            try:
                loader.wait(30)
            except Exception:  # noqa: BLE001
                loader.kill()
            shutil.rmtree(loader.shm_dir, ignore_errors=True)
    summary = write_summary(runs, args, command, machine, date, gaps, final=True)
    try:
        plot(summary, args.plot)
        print(f"wrote {args.out} and {args.plot}")
    except ImportError:
        print(f"wrote {args.out} (matplotlib missing: no plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
