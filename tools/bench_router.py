"""Benchmark the router's placement policies on a serverless workload over real Triton servers (CPU, tiny models).

    python -m tritonmoe.tools.bench_router [--models 8] [--servers 3] [--requests 60] [--mean-gap 1.5] [--cv 4]
        [--keep-alive 6] [--max-models 2] [--max-tokens 16] [--policies locality,random,round_robin]
        [--out docs/results/router_bench.json] [--plot docs/figures/router_bench.png]

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


def build_models(n: int) -> list[Path]:
    out = []
    for i in range(n):
        arch = ARCHS[i % len(ARCHS)]
        dest = tritonmoe_home() / "models" / f"bench-router-{i}-{arch}"
        if not (dest / "config.json").exists():
            tiny_models.build(tiny_models.TinySpec(arch=arch, layers=2, seed=i), dest, overwrite=True)
        out.append(dest)
    return out


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


def run_policy(policy, servers, checkpoints, trace, args):
    hosts = [{"name": f"h{i}", "http": s.http_url, "grpc": s.grpc_url, "metrics": s.metrics_url,
              "max_models": args.max_models} for i, s in enumerate(servers)]
    models = {f"m{i}": {"checkpoint": str(c), "keep_alive_s": args.keep_alive, "max_instances": 2,
                        "target_concurrency": 4} for i, c in enumerate(checkpoints)}
    cfg = RouterConfig.parse({"hosts": hosts, "models": models, "policy": policy, "listen": {"port": 0},
                              "poll_interval_s": 0.5, "first_token_timeout_s": 120, "load_timeout_s": 300})
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
        gpu_s = router.call(_loaded_seconds(mgr))
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    tiers = {}
    for c in cold:
        tiers[c["tier"]] = tiers.get(c["tier"], 0) + 1
    return {"policy": policy, "requests": len(results), "errors": len(results) - len(ok),
            "ttft_mean": statistics.fmean(ttft) if ttft else None, "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99), "e2e_mean": statistics.fmean(e2e) if e2e else None,
            "e2e_p99": percentile(e2e, 99), "cold_starts": len(cold), "cold_starts_by_tier": tiers,
            "mean_load_s": statistics.fmean([c["seconds"] for c in cold]) if cold else 0.0,
            "instance_seconds": gpu_s, "wall_s": wall, "per_request": results}


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
        servers.append(TritonServer(tmp / f"repo{i}", log_path=tmp / f"server{i}.log"))
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
    fig.suptitle(f"router placement, {summary['trace']['requests']} requests over {summary['trace']['models']} "
                 f"models, {summary['trace']['servers']} Triton servers (CPU, tiny models), Gamma CV "
                 f"{summary['trace']['cv']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


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
    args = p.parse_args(argv)

    command = "python -m tritonmoe.tools.bench_router " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"command: {command}\nmachine: {machine}\ndate:    {date}", flush=True)
    checkpoints = build_models(args.models)
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
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    # sysconfig fills its variables lazily and not thread-safely: a first call racing in several threads can
    # return LIBDIR None, and a server started without libpython on LD_LIBRARY_PATH fails every model load
    sysconfig.get_config_vars()
    servers = []
    for i in range(args.servers):
        (tmp / f"repo{i}").mkdir()
        servers.append(TritonServer(tmp / f"repo{i}", log_path=tmp / f"server{i}.log"))
    runs = []
    try:
        with concurrent.futures.ThreadPoolExecutor(args.servers) as pool:
            list(pool.map(lambda s: s.start(timeout=120), servers))
        for policy in args.policies.split(","):
            unload_all(servers)
            print(f"--- {policy}", flush=True)
            r = run_policy(policy, servers, checkpoints, trace, args)
            runs.append(r)
            print(f"{policy:12s} TTFT mean {r['ttft_mean']:.2f}s p99 {r['ttft_p99']:.2f}s | E2E mean "
                  f"{r['e2e_mean']:.2f}s p99 {r['e2e_p99']:.2f}s | cold starts {r['cold_starts']} "
                  f"{r['cold_starts_by_tier']} (mean load {r['mean_load_s']:.1f}s) | instance-s "
                  f"{r['instance_seconds']:.0f} | errors {r['errors']}", flush=True)
    finally:
        for s in servers:
            s.stop()
    base = {r["policy"]: r for r in runs}
    summary = {"command": command, "machine": machine, "date": date,
               "trace": {"requests": args.requests, "models": args.models, "servers": args.servers,
                         "cv": args.cv, "mean_gap_s": args.mean_gap, "keep_alive_s": args.keep_alive,
                         "max_models_per_server": args.max_models, "max_tokens": args.max_tokens,
                         "measured_cv": float(gaps.std() / gaps.mean())},
               "runs": runs}
    if "locality" in base:
        loc = base["locality"]
        summary["ratios"] = {other: {"ttft_mean": base[other]["ttft_mean"] / loc["ttft_mean"],
                                     "e2e_mean": base[other]["e2e_mean"] / loc["e2e_mean"],
                                     "ttft_p99": base[other]["ttft_p99"] / loc["ttft_p99"]}
                             for other in base if other != "locality"}
        for other, ratio in summary["ratios"].items():
            print(f"{other} / locality: mean TTFT x{ratio['ttft_mean']:.1f}, mean E2E x{ratio['e2e_mean']:.1f}, "
                  f"P99 TTFT x{ratio['ttft_p99']:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    try:
        plot(summary, args.plot)
        print(f"wrote {args.out} and {args.plot}")
    except ImportError:
        print(f"wrote {args.out} (matplotlib missing: no plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
