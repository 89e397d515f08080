"""Cold start through Triton: time from a repository-API ``load`` to the first generated token, per load path.

One random-weight MoE checkpoint of about ``--gb`` GB is built (HF format), converted once to tritonmoe's
loading-optimised format, and put in a loader service's DRAM cache. One ``tritonserver`` then loads the same model
three ways, one after the other, each followed by a one-token request and an unload:

- ``hf``: the plain path, transformers ``from_pretrained`` on the HF folder (the foundation's path);
- ``converted``: the converted folder read by tritonmoe's parallel reader (no loader service);
- ``loader``: ``loader_url`` set: weights copied from the loader's shared-memory DRAM cache.

It prints the command, machine and date, a table of load / first-token / total seconds with the backend's own
start-up phases (``tritonmoe_startup_seconds``), and ratios against ``hf``; ``--out`` writes JSON.

    python -m tritonmoe.tools.bench_startup --device gpu --gb 16 --out bench_startup.json
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

from . import tiny_models
from .client import generate, load_model, unload_model
from .model_config import read_config, with_overrides
from .serve import spawn_loader
from .tritonserver import TritonServer, tritonmoe_home

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "startup_moe"
PATHS = ("hf", "converted", "loader")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tritonmoe.tools.bench_startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=0.05, help="approximate checkpoint size in GB (bf16)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    p.add_argument("--repeat", type=int, default=1, help="loads per path (the table shows the fastest)")
    p.add_argument("--workdir", type=Path, help="where the checkpoints, loader state and logs go (default: temp)")
    p.add_argument("--out", type=Path, help="JSON result file")
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


def wait_unloaded(server: TritonServer, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST")
        index = json.loads(urllib.request.urlopen(req, timeout=10).read())
        if all(m.get("state") != "READY" and m.get("state") != "UNLOADING" for m in index if m["name"] == MODEL):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{MODEL} did not unload within {timeout}s")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    gpu = torch.cuda.get_device_name(0) if a.device == "gpu" and torch.cuda.is_available() else "none"
    say(f"command: python -m tritonmoe.tools.bench_startup {shlex.join(argv if argv is not None else sys.argv[1:])}")
    say(f"date:    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, GPU {gpu}")
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
    result = {"command": sys.argv, "gb": nbytes / 1e9, "spec": spec.__dict__, "device": a.device, "gpu": gpu,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "paths": {}}
    server = TritonServer(REPO_ROOT / "model_repository", log_path=work / "tritonserver.log")
    try:
        if "loader" in a.paths:
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
        server.start(timeout=120)
        base = read_config(REPO_ROOT / "model_repository" / "tiny_moe")
        shim = (REPO_ROOT / "model_repository" / "tiny_moe" / "1" / "model.py").read_bytes()
        kind = "KIND_GPU" if a.device == "gpu" else "KIND_CPU"
        for path in a.paths:
            params = {"checkpoint": str(hf if path == "hf" else converted), "dtype": "bfloat16"}
            if path == "loader":
                params.update(checkpoint=MODEL, loader_url=url)
            config = with_overrides(base, parameters=params, kind=kind, gpus=[0] if kind == "KIND_GPU" else None)
            config["name"] = MODEL
            runs = []
            for _ in range(a.repeat):
                if a.device == "gpu":
                    subprocess.run(["sync"], check=False)
                t0 = time.perf_counter()
                load_model(server.http_url, MODEL, config, files={"1/model.py": shim})
                t1 = time.perf_counter()
                generate(server.http_url, MODEL, "def main():", max_tokens=1)
                t2 = time.perf_counter()
                runs.append({"load_s": t1 - t0, "first_token_s": t2 - t1, "total_s": t2 - t0,
                             "phases": startup_phases(server)})
                unload_model(server.http_url, MODEL)
                wait_unloaded(server)
            best = min(runs, key=lambda r: r["total_s"])
            result["paths"][path] = {"best": best, "runs": runs}
            say(f"  {path:9s} load {best['load_s']:7.2f}s  first token {best['first_token_s']:6.3f}s  "
                f"total {best['total_s']:7.2f}s  ({nbytes / 1e9 / best['total_s']:.2f} GB/s)  phases "
                + ", ".join(f"{k} {v:.2f}s" for k, v in best["phases"].items()))
    finally:
        server.stop()
        if loader is not None:
            loader.terminate()
            loader.wait(30)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
    say("")
    say("| path | Triton load (s) | first token (s) | load → first token (s) | GB/s | vs hf |")
    say("|---|---:|---:|---:|---:|---:|")
    hf_total = result["paths"].get("hf", {}).get("best", {}).get("total_s")
    for path, r in result["paths"].items():
        b = r["best"]
        ratio = f"{hf_total / b['total_s']:.2f}x" if hf_total else "-"
        say(f"| {path} | {b['load_s']:.2f} | {b['first_token_s']:.3f} | {b['total_s']:.2f} | "
            f"{nbytes / 1e9 / b['total_s']:.2f} | {ratio} |")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1, default=str))
        say(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
