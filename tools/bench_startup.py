"""Cold start through Triton: time from a repository-API ``load`` to the first generated token, per load path.

One random-weight MoE checkpoint of about ``--gb`` GB is built (HF format), converted once to tritonmoe's
loading-optimised format, and put in a loader service's DRAM cache. One ``tritonserver`` then loads the same model
up to four ways, each load followed by a one-token request and an unload:

- ``hf``: the plain path, transformers ``from_pretrained`` on the HF folder (the foundation's path);
- ``converted``: the converted folder read by tritonmoe's parallel reader (no loader service);
- ``loader``: ``loader_url`` set: weights copied from the loader's shared-memory DRAM cache;
- ``pool``: ``loader_url`` and ``engine_pool`` set: the same weights moved into an already-running worker of a warm
  engine pool (torch, transformers, CUDA context and kernels loaded before the load; the stub imports no torch).
  Before every load the bench waits until each pool's replacement worker is warm (``pool_wait``, not counted): a
  load is measured against pools in their steady state, with no worker warming up beside it.
- ``pool_pinned``: as ``pool``, from a second pool whose workers map and page-lock the loader's DRAM-resident
  models before a claim (``tritonmoe-engine-pool --prepin-loader URL``), so the copy needs no page-locking on the way.

By default the server runs with ``--disable-auto-complete-config`` (Triton's advice for secure deployments) and each
load sends a complete config: with auto-complete on, Triton starts one extra stub process per load only to complete
the config (``--auto-complete-config`` measures that way, as the first H100 run did).

``--repeat N`` runs N rounds, each loading every path once in turn (interleaved, so drift hits all paths alike),
after one unrecorded warm-up load (so the first recorded stub does not pay for a cold page cache). It prints the
command, machine and date, a line per load, and a table of the median load (by load -> first token) per path with
the backend's own start-up phases (``tritonmoe_startup_seconds``) and ratios against ``hf``; ``--out`` writes JSON.

    python -m tritonmoe.tools.bench_startup --device gpu --gb 16 --paths hf,loader,pool --repeat 2 --out b.json

``--plot A.json [B.json ...]`` runs nothing: it draws the median load of each path of each result file as one
stacked bar (Triton load split into its known phases, then the first token) into ``--plot-path``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tritonmoe.backend.io_spec import complete_config

from . import tiny_models
from .client import GenerateError, generate, load_model, unload_model
from .model_config import read_config, with_overrides
from .serve import spawn_loader, spawn_pool, stop_pool
from .tritonserver import TritonServer, tritonmoe_home

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "startup_moe"
PATHS = ("hf", "converted", "loader", "pool", "pool_pinned")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tritonmoe.tools.bench_startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=0.05, help="approximate checkpoint size in GB (bf16)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds; each loads every path once (the table shows each path's median load)")
    p.add_argument("--no-warmup", action="store_true", help="skip the unrecorded warm-up load before the rounds")
    p.add_argument("--auto-complete-config", action="store_true",
                   help="let Triton complete each config (a stub process per load just for that, as the first H100 "
                        "run did); default: send complete configs to a server started with "
                        "--disable-auto-complete-config")
    p.add_argument("--pool-replace-delay", type=float, default=0.0, metavar="SECONDS",
                   help="the pools' --replace-delay: start a claimed worker's replacement this long after the claim")
    p.add_argument("--pool-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each pooled load, once the pool is warm, wait this long: the claimed worker has sat "
                        "idle at least that long, as it would between bursts in service")
    p.add_argument("--workdir", type=Path, help="where the checkpoints, loader state and logs go (default: temp)")
    p.add_argument("--out", type=Path, help="JSON result file")
    p.add_argument("--plot", type=Path, nargs="+", metavar="RESULT", help="plot these JSON results; run nothing")
    p.add_argument("--plot-labels", help="a label per --plot file, comma-separated ('|'-separated if a label has a comma)")
    p.add_argument("--plot-path", type=Path, default=Path("startup.png"), help="PNG written by --plot")
    a = p.parse_args(argv)
    a.paths = [x for x in a.paths.split(",") if x]
    bad = sorted(set(a.paths) - set(PATHS))
    if bad:
        p.error(f"unknown path(s) {bad}; choose from {', '.join(PATHS)}")
    return a


def spec_for(gb: float) -> tiny_models.TinySpec:
    """A Mixtral-style shape whose bf16 weights come to about ``gb`` GB: hidden 2048, 16 experts of FFN 4096
    (0.81 GB of experts per layer), as many layers as it takes."""
    per_layer = 16 * 3 * 2048 * 4096 * 2 + 4 * 2048 * 2048 * 2
    if gb < 1:  # small runs (CPU checks): shrink the width instead
        return tiny_models.TinySpec(arch="mixtral", layers=2, hidden=256, heads=4, kv_heads=2, experts=8,
                                    expert_ffn=max(64, int(gb * 1e9 / (2 * 8 * 3 * 256 * 2)) // 64 * 64),
                                    dtype="bfloat16", shard_mb=2048)
    layers = max(1, round(gb * 1e9 / per_layer))
    return tiny_models.TinySpec(arch="mixtral", layers=layers, hidden=2048, heads=16, kv_heads=4, experts=16,
                                expert_ffn=4096, dtype="bfloat16", shard_mb=4096)


def folder_bytes(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def startup_phases(server: TritonServer) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    phases = {}
    for line in text.splitlines():
        if line.startswith("tritonmoe_startup_seconds{") and f'model="{MODEL}"' in line:
            phase = re.search(r'phase="([^"]+)"', line).group(1)
            phases[phase] = float(line.rsplit(" ", 1)[1])
    return phases


FIRST_STEP = re.compile(r"first engine step of this model: ([0-9.]+)s")


def torch_kernel_cache() -> dict:
    """Where torch keeps the kernels it compiles at run time, and how many it holds: a fresh machine starts with
    none, and the first pooled load there is slower (docs/loader.md), which this lets a run relate to the cache."""
    folder = Path(os.environ.get("PYTORCH_KERNEL_CACHE_PATH")
                  or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch" / "kernels")
    files = sum(1 for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    return {"path": str(folder), "files": files}


def first_steps(log: Path) -> list[float]:
    """Every "first engine step" an engine host logged to ``log`` (Triton's log for the stub, the pool's log for
    its workers): the first forward's own time, to tell from the first token's time around it."""
    return [float(x) for x in FIRST_STEP.findall(Path(log).read_text(errors="replace"))]


def unloaded_count(server: TritonServer) -> int:
    return server.log_path.read_text(errors="replace").count(f"successfully unloaded '{MODEL}'")


def wait_unloaded(server: TritonServer, before: int, timeout: float = 120) -> None:
    """Until Triton logged the unload: its repository index says UNAVAILABLE while the old instance is still
    finalizing, and loading the same model again during that (no auto-complete stub to wait for) crashed
    tritonserver 2.51 on the CPU machine (SIGSEGV in the Python backend at the next request)."""
    deadline = time.monotonic() + timeout
    while unloaded_count(server) <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{MODEL} did not unload within {timeout}s")
        time.sleep(0.1)


def wait_pool_warm(socket_path: str, timeout: float = 300) -> float:
    """Seconds until the pool has a warm worker again (its replacement after the previous claim)."""
    from tritonmoe.backend.engine_pool import pool_status

    t0 = time.perf_counter()
    while sum(pool_status(socket_path)["warm"].values()) < 1:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"the engine pool at {socket_path} has no warm worker after {timeout}s")
        time.sleep(0.1)
    return time.perf_counter() - t0


def plot(files: list[Path], labels: str | None, out: Path, target: float = 1.5) -> int:
    """One horizontal stacked bar per (file, path): the median run's Triton load split into its known phases, then
    the first token; the total at the bar's end and a dashed line at the ``target``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = labels.split("|" if "|" in (labels or "") else ",") if labels else [f.name for f in files]
    if len(names) != len(files):
        raise SystemExit(f"--plot-labels: {len(names)} label(s) for {len(files)} file(s)")
    for f in files:
        if not f.is_file():
            raise SystemExit(f"--plot: no such result file: {f}")
    results = [json.loads(f.read_text()) for f in files]
    colors = {"pool_claim": "#9467bd", "gpu_copy": "#1f77b4", "build": "#2ca02c", "weights": "#17becf",
              "other": "#c7c7c7", "first token": "#ff7f0e"}
    bars = []  # (label, [(segment, seconds)], total)
    for name, r in zip(names, results):
        for path, p in r["paths"].items():
            m, ph = p["median"], p["median"].get("phases", {})
            known = [k for k in ("pool_claim", "gpu_copy", "build") if k in ph] or [k for k in ("weights",) if k in ph]
            segs = [(k, ph[k]) for k in known]
            segs += [("other", max(0.0, m["load_s"] - sum(v for _, v in segs))), ("first token", m["first_token_s"])]
            bars.append((f"{name}\n{path} (median of {len(p['runs'])})", segs, m["total_s"]))
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.75 * len(bars)))
    seen = set()
    for y, (_, segs, total) in enumerate(bars):
        left = 0.0
        for k, v in segs:
            ax.barh(y, v, left=left, color=colors[k], edgecolor="white", linewidth=0.5,
                    label=None if k in seen else k)
            seen.add(k)
            left += v
        ax.annotate(f"{total:.2f} s", (left, y), xytext=(5, 0), textcoords="offset points", va="center",
                    fontsize=9, fontweight="bold", bbox=dict(facecolor="white", edgecolor="none", pad=1))
    ax.axvline(target, color="red", linestyle="--", linewidth=1)
    ax.text(target, -0.5, f" target <= {target:g} s", color="red", fontsize=9, va="bottom")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=9)
    ax.set_ylim(len(bars) - 0.4, -0.9)
    ax.set_xlim(0, max(b[2] for b in bars) * 1.12)
    ax.set_xlabel("seconds from the repository-API load to the first token (linear)")
    gpus = ", ".join(sorted({r.get("gpu", "?") for r in results}))
    gbs = ", ".join(sorted({f"{r['gb']:.1f}" for r in results if "gb" in r}))
    ax.set_title(f"Triton load -> first token on {gpus}, {gbs} GB MoE checkpoint (bf16)", fontsize=11)
    handles = dict(zip(*ax.get_legend_handles_labels()[::-1]))
    ax.legend([handles[k] for k in colors if k in handles], [k for k in colors if k in handles], fontsize=8,
              ncol=len(handles), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax.grid(axis="x", alpha=0.3)
    dates = "; ".join(f"{f.name}: {str(r.get('date', '?'))[:16].replace('T', ' ')} UTC" for f, r in zip(files, results))
    fig.text(0.01, 0.01, dates, fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    print(f"figure: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.plot:
        return plot(a.plot, a.plot_labels, a.plot_path)
    import torch

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    gpu = torch.cuda.get_device_name(0) if a.device == "gpu" and torch.cuda.is_available() else "none"
    say(f"command: python -m tritonmoe.tools.bench_startup {shlex.join(argv if argv is not None else sys.argv[1:])}")
    say(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, GPU {gpu}")
    kernels_before = torch_kernel_cache()
    say(f"torch kernel cache: {kernels_before['path']} ({kernels_before['files']} files)")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)

    spec = spec_for(a.gb)
    t = time.perf_counter()
    hf = tiny_models.build(spec, tritonmoe_home() / "models" / f"startup-{a.gb:g}gb",
                           device="cuda" if a.device == "gpu" else "cpu")
    nbytes = folder_bytes(hf, "*.safetensors")
    say(f"checkpoint: {hf} ({nbytes / 1e9:.2f} GB, {spec.layers} layers; {time.perf_counter() - t:.1f}s)")
    from tritonmoe.loader.convert import convert

    t = time.perf_counter()
    converted = convert(hf, work / "converted", progress=False).dest
    say(f"converted:  {converted} ({time.perf_counter() - t:.1f}s)")

    loader = shm = None
    pools: dict = {}
    result = {"command": sys.argv, "gb": nbytes / 1e9, "spec": spec.__dict__, "device": a.device, "gpu": gpu,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "paths": {},
              "auto_complete_config": a.auto_complete_config, "repeat": a.repeat, "pool_replace_delay": a.pool_replace_delay,
              "pool_idle": a.pool_idle}
    server = TritonServer(REPO_ROOT / "model_repository", log_path=work / "tritonserver.log",
                          extra_args=[] if a.auto_complete_config else ["--disable-auto-complete-config"])
    try:
        if {"loader", "pool", "pool_pinned"} & set(a.paths):
            from tritonmoe.loader.client import LoaderClient

            shm = Path("/dev/shm") / f"tritonmoe-bench-startup-{os.getpid()}"
            loader, url = spawn_loader(work / "loader", shm, int(nbytes * 1.2) + (256 << 20))
            t = time.perf_counter()
            client = LoaderClient(url)
            client.register(MODEL, converted)
            client.load(MODEL)
            result["dram_fill_s"] = time.perf_counter() - t
            say(f"loader:     {url}, DRAM cache filled in {result['dram_fill_s']:.1f}s "
                f"({nbytes / 1e9 / result['dram_fill_s']:.2f} GB/s)")
        for path in ("pool", "pool_pinned"):
            if path not in a.paths:
                continue
            from tritonmoe.backend.engine_pool import pool_status

            t = time.perf_counter()
            pools[path] = pool = spawn_pool("0" if a.device == "gpu" else "cpu", work / f"engine-{path}.log",
                                            extra_args=["--replace-delay", str(a.pool_replace_delay)]
                                            + (["--prepin-loader", url] if path == "pool_pinned" else []))
            warm = [w["warm"] for w in pool_status(pool.socket)["workers"] if w["state"] == "warm"]
            result.setdefault("pool_warm", {})[path] = warm
            say(f"{path + ':':11s} {pool.socket}, first worker warm in {time.perf_counter() - t:.1f}s ("
                + ", ".join(f"{k} {v:.2f}s" for k, v in (warm[0]["phases"] if warm else {}).items())
                + f"; log {pool.log_path})")
        server.start(timeout=120)
        base = read_config(REPO_ROOT / "model_repository" / "tiny_moe")
        shim = (REPO_ROOT / "model_repository" / "tiny_moe" / "1" / "model.py").read_bytes()
        kind = "KIND_GPU" if a.device == "gpu" else "KIND_CPU"

        def load_once(path: str) -> dict:
            params = {"checkpoint": str(hf if path == "hf" else converted), "dtype": "bfloat16"}
            if path in ("loader", "pool", "pool_pinned"):
                params.update(checkpoint=MODEL, loader_url=url)
            # every pool back to its warm count first: a replacement still warming up (importing torch) would
            # compete with the load being measured, whichever path it takes
            pool_wait = sum(wait_pool_warm(pool.socket) for pool in pools.values())
            if path in pools:
                params["engine_pool"] = pools[path].socket
                time.sleep(a.pool_idle)
            config = with_overrides(base, parameters=params, kind=kind, gpus=[0] if kind == "KIND_GPU" else None)
            config["name"] = MODEL
            if not a.auto_complete_config:
                config = complete_config(config)
            if a.device == "gpu":
                subprocess.run(["sync"], check=False)
            engine_log = pools[path].log_path if path in pools else server.log_path
            steps_before = len(first_steps(engine_log))
            t0 = time.perf_counter()
            load_model(server.http_url, MODEL, config, files={"1/model.py": shim})
            t1 = time.perf_counter()
            try:
                generate(server.http_url, MODEL, "def main():", max_tokens=1)
            except GenerateError:  # loaded but cannot generate: unload it (and wait) so the next path starts clean
                before = unloaded_count(server)
                unload_model(server.http_url, MODEL)
                wait_unloaded(server, before)
                raise
            t2 = time.perf_counter()
            run = {"load_s": t1 - t0, "first_token_s": t2 - t1, "total_s": t2 - t0, "phases": startup_phases(server)}
            deadline = time.monotonic() + 3  # the stub's log lines reach the file a moment later
            while len(steps := first_steps(engine_log)) <= steps_before and time.monotonic() < deadline:
                time.sleep(0.1)
            if len(steps) > steps_before:
                run["first_step_s"] = steps[-1]
            if path in pools:
                run["pool_wait_s"] = pool_wait
            before = unloaded_count(server)
            unload_model(server.http_url, MODEL)
            wait_unloaded(server, before)
            return run

        plan = ([] if a.no_warmup else [a.paths[0]]) + [path for _ in range(a.repeat) for path in a.paths]
        runs = {path: [] for path in a.paths}
        failed: dict[str, str] = {}  # a path that failed once is not tried again; the others go on
        for i, path in enumerate(plan):
            if path in failed:
                continue
            try:
                run = load_once(path)
            except Exception as e:  # noqa: BLE001 - reported in the table and the JSON, the run goes on
                failed[path] = f"{type(e).__name__}: {e}"[:2000]
                say(f"  {path:9s} FAILED: {failed[path][:400]}")
                result.setdefault("failed", {})[path] = failed[path]
                continue
            warmup = i == 0 and not a.no_warmup
            if warmup:
                result["warmup"] = {"path": path, **run}
            else:
                runs[path].append(run)
            say(f"  {'warm-up' if warmup else 'round ' + str((i - (not a.no_warmup)) // len(a.paths) + 1):8s} "
                f"{path:9s} load {run['load_s']:7.2f}s  first token {run['first_token_s']:6.3f}s  "
                + (f"(engine step {run['first_step_s']:.3f}s)  " if "first_step_s" in run else "")
                + f"total {run['total_s']:7.2f}s  "
                + (f"(waited {run['pool_wait_s']:.1f}s for a warm worker)  " if "pool_wait_s" in run else "")
                + "phases " + ", ".join(f"{k} {v:.2f}s" for k, v in run["phases"].items()))
        for path, rs in runs.items():
            if not rs:
                continue
            ordered = sorted(rs, key=lambda r: r["total_s"])
            result["paths"][path] = {"median": ordered[(len(ordered) - 1) // 2], "best": ordered[0], "runs": rs}
    finally:
        server.stop()
        for pool in pools.values():
            stop_pool(pool)
        if loader is not None:
            loader.terminate()
            loader.wait(30)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
    result["torch_kernel_cache"] = {"before": kernels_before, "after": torch_kernel_cache()}
    say(f"torch kernel cache after the run: {result['torch_kernel_cache']['after']['files']} files")
    say("")
    say(f"median of {a.repeat} load(s) per path" + ("" if a.no_warmup else f", after a warm-up load ({a.paths[0]})")
        + ("; Triton auto-completes each config" if a.auto_complete_config else
           "; complete configs, --disable-auto-complete-config"))
    say("| path | Triton load (s) | first token (s) | load → first token (s) | best (s) | GB/s | vs hf | phases (s) |")
    say("|---|---:|---:|---:|---:|---:|---:|---|")
    hf_total = result["paths"].get("hf", {}).get("median", {}).get("total_s")
    for path, r in result["paths"].items():
        m = r["median"]
        ratio = f"{hf_total / m['total_s']:.2f}x" if hf_total else "-"
        phases = ", ".join(f"{k} {v:.2f}" for k, v in m["phases"].items())
        say(f"| {path} | {m['load_s']:.2f} | {m['first_token_s']:.3f} | {m['total_s']:.2f} | "
            f"{r['best']['total_s']:.2f} | {nbytes / 1e9 / m['total_s']:.2f} | {ratio} | {phases} |")
    for path, error in result.get("failed", {}).items():
        say(f"| {path} | failed | | | | | | {error[:200]} |")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1, default=str))
        say(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
