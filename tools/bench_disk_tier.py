"""The disk tier (``expert_host_tier: disk``) beside its peers: time per output token, disk bytes read and anonymous
memory when a model's experts are served from disk, one model, one prompt, greedy, batch 1, side by side.

Rows:
- ``resident``: transformers with the whole model in memory (its tokens are the reference for every row);
- ``packed``: tritonmoe offloading with the experts packed in host memory (the RAM tier);
- ``disk warm``: ``expert_host_tier: disk``, the checkpoint files' pages in the page cache;
- ``disk cold``: the same, every file page dropped from the process and the page cache before each decode step
  (``madvise`` + ``posix_fadvise`` DONTNEED), so each miss reads the disk -- a host whose memory cannot keep them;
- ``accelerate disk warm`` / ``cold``: Hugging Face Accelerate's ``device_map`` disk offload of the experts
  modules (``offload_folder``), the same page-dropping for the cold row.
Each row runs in a fresh process (its anonymous memory after loading is its own); every row's tokens are compared
with the resident ones (a mismatch is reported, not hidden). On a CPU the "device" cache is host memory too, so
the offloading rows pay a copy per miss that Accelerate's CPU path, reading its memory-mapped files in place, does
not: the CPU shows the disk traffic and the tiers' relative costs, the GPU the speed.

    python -m tritonmoe.tools.bench_disk_tier --out docs/results/disk_tier_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tritonmoe.tools.bench_loader import machine, smaps_rollup

PROMPT = "def fibonacci(n):\n    "


def disk_read_bytes() -> int:
    """Bytes this process has read from storage (page-cache hits not counted): /proc/self/io."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


MADV_DONTNEED = 4


def drop_file_pages(paths: list[Path]) -> None:
    """Drop this process's pages of every mapping of ``paths`` (``madvise``; they fault back in from the file) and
    ask the kernel to drop the files from the page cache (``posix_fadvise``): the next read goes to the disk."""
    names = {str(p.resolve()) for p in paths}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, MADV_DONTNEED)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a file just written) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_generate(model, ids, new_tokens: int, before_step=None, offloader=None) -> dict:
    """Greedy ``new_tokens`` tokens; the time to the first and per later token, disk bytes read per token."""
    stamps = []

    def pre_hook(module, args, kwargs):
        if before_step is not None:
            before_step()
        if offloader is not None:
            rows = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
            offloader.begin_forward(["r"], "prefill" if rows.shape[1] > 1 else "decode")

    def post_hook(module, args, output):
        stamps.append(time.perf_counter())

    hooks = [model.register_forward_pre_hook(pre_hook, with_kwargs=True), model.register_forward_hook(post_hook)]
    read0 = disk_read_bytes()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
        if offloader is not None:
            offloader.end_sequence("r")
    read = disk_read_bytes() - read0
    return {"tokens": out[0, ids.shape[1]:].tolist(), "ttft_ms": (stamps[0] - start) * 1e3,
            "tpot_ms": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3,
            "disk_mb_per_token": read / new_tokens / 1e6}


ROWS = ("resident", "packed", "disk warm", "disk cold", "accelerate disk warm", "accelerate disk cold")


def run_row(row: str, hf: Path, conv: Path, args) -> dict:
    """One row, in this (fresh) process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tritonmoe.backend.config import EngineConfig
    from tritonmoe.backend.weights import load_for_serving

    device = torch.device(args.device)
    ids = AutoTokenizer.from_pretrained(hf)(PROMPT, return_tensors="pt").input_ids.to(device)
    anon = smaps_rollup()["Anonymous"]
    offloader, files, extra = None, [], {}
    if row == "resident":
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).to(device).eval()
    elif not row.startswith("accelerate"):
        loaded = load_for_serving(EngineConfig.from_parameters({
            "checkpoint": str(conv), "expert_cache_budget": f"{args.budget}%",
            "expert_host_tier": "packed" if row == "packed" else "disk"}), device)
        model, offloader = loaded.model, loaded.offloader
        files = sorted(conv.glob("partition-*.bin"))
    else:
        folder = Path(tempfile.mkdtemp(prefix="accelerate-offload-", dir=args.workdir))
        meta = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, device_map="meta")
        # the experts modules on disk, every other leaf module on the device
        device_map = {n: ("disk" if n.endswith(".experts") else args.device) for n, m in meta.named_modules()
                      if n and (n.endswith(".experts") or not any(True for _ in m.children()))
                      and ".experts." not in n}
        del meta
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, device_map=device_map,
                                                     offload_folder=str(folder)).eval()
        # what Accelerate reads the experts from: its offload folder, or (safetensors checkpoints) the originals
        files = sorted(folder.rglob("*.dat")) + sorted(hf.glob("*.safetensors"))
    anon_load = smaps_rollup()["Anonymous"] - anon
    drop = (lambda: drop_file_pages(files)) if row.endswith("cold") else None
    timed_generate(model, ids, 2, offloader=offloader)  # warm-up
    before = offloader.stats() if offloader is not None else None
    result = timed_generate(model, ids, args.new_tokens, before_step=drop, offloader=offloader)
    if offloader is not None:
        stats = offloader.stats()
        extra["hit_rate"] = (stats["hits"] - before["hits"]) / max(1, stats["uses"] - before["uses"])
        # what the misses and the prefetches moved (the disk reads above also hold the non-expert weights that
        # the CPU model reads in place from the mapping)
        moved = sum(stats[k] - before[k] for k in ("misses", "prefetches"))
        extra["moved_mb_per_token"] = moved * stats["slot_bytes"] / args.new_tokens / 1e6
        # the engine's own count (mincore before each batch's copies) beside the kernel's read_bytes above
        extra["disk_stat_mb_per_token"] = (stats["disk_bytes"] - before["disk_bytes"]) / args.new_tokens / 1e6
        offloader.close()
    return {"row": row, **result, "anon_mb_after_load": anon_load / 1e6, **extra}


def run(args) -> dict:
    from tritonmoe.loader.convert import convert
    from tritonmoe.loader.format import read_index
    from tritonmoe.tools.tiny_models import TinySpec, build

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-disk-"))
    spec = TinySpec(arch=args.arch, layers=args.layers, experts=args.experts, top_k=2, hidden=args.hidden,
                    heads=8, kv_heads=4, expert_ffn=args.expert_ffn, vocab=512, shard_mb=256)
    hf = build(spec, workdir / "hf")
    conv = convert(hf, workdir / "converted", progress=False).dest
    index = read_index(conv)
    expert_bytes = sum(index.tensors[n].bytes for e in index.experts for n in e.tensors)
    print(f"model: {args.arch}, {args.layers} layers x {args.experts} experts, {expert_bytes / 1e6:.0f} MB of "
          f"experts ({expert_bytes / 1e6 / (args.layers * args.experts):.1f} MB each); cache {args.budget}%",
          flush=True)
    rows, reference = [], None
    for row in args.rows:
        child = subprocess.run([sys.executable, "-m", "tritonmoe.tools.bench_disk_tier", "--child", row, str(hf),
                                str(conv), *args.argv], capture_output=True, text=True, timeout=1200)
        if child.returncode != 0:
            print(f"{row:22s} failed: {child.stderr.strip().splitlines()[-1] if child.stderr.strip() else '?'}")
            rows.append({"row": row, "error": child.stderr[-2000:]})
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        reference = reference if reference is not None else r["tokens"]
        r["tokens_equal_resident"] = r.pop("tokens") == reference
        rows.append(r)
        print(f"{row:22s} TPOT {r['tpot_ms']:8.2f} ms  TTFT {r['ttft_ms']:8.2f} ms  disk read "
              f"{r['disk_mb_per_token']:7.1f} MB/token"
              + (f" (engine's count {r['disk_stat_mb_per_token']:6.1f}; experts moved {r['moved_mb_per_token']:6.1f},"
                 f" hit rate {r['hit_rate']:.2f})" if "hit_rate" in r else "")
              + f"  anon +{r['anon_mb_after_load']:6.0f} MB after load  tokens "
              f"{'=' if r['tokens_equal_resident'] else '!='} resident", flush=True)
    base = next((r["tpot_ms"] for r in rows if r["row"] == "resident" and "tpot_ms" in r), None)
    return {"command": "python -m tritonmoe.tools.bench_disk_tier " + " ".join(args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(),
            "torch": torch.__version__, "device": args.device,
            "model": {"arch": args.arch, "layers": args.layers, "experts": args.experts, "hidden": args.hidden,
                      "expert_ffn": args.expert_ffn, "expert_bytes": expert_bytes}, "budget_pct": args.budget,
            "new_tokens": args.new_tokens, "rows": rows,
            "tpot_vs_resident": {r["row"]: r["tpot_ms"] / base for r in rows if base and "tpot_ms" in r}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mixtral")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-ffn", type=int, default=2048)
    p.add_argument("--budget", type=float, default=25, help="device expert cache, %% of the routed experts")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW",
                   help=f"rows to run: {', '.join(ROWS)} (default: all)")
    p.add_argument("--workdir", help="where the model and Accelerate's offload folder go (a disk, not tmpfs)")
    p.add_argument("--out")
    p.add_argument("--child", nargs=3, metavar=("ROW", "HF", "CONVERTED"), help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    if raw and raw[0] == "--child":  # one row in this fresh process: print its result as one JSON line
        row, hf, conv = raw[1:4]
        args = p.parse_args(raw[4:])
        print(json.dumps(run_row(row, Path(hf), Path(conv), args)))
        return
    args = p.parse_args(raw)
    args.argv = raw
    print(f"command: python -m tritonmoe.tools.bench_disk_tier {' '.join(args.argv)}\nmachine: {machine()}\n"
          f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    result = run(args)
    print("TPOT / resident: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["tpot_vs_resident"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
