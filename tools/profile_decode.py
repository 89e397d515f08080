"""Where a decode step's time goes: the engine's generate loop under ``torch.profiler``, on one random MoE.

Prints the time per token, the number of kernel launches and host<->device synchronisations per token, and the top
operators by host and by device time, so a change to the engine can be judged by what it removes. Not a benchmark
of record (the profiler adds overhead); ``tools/bench_serving.py`` is.

    python -m tritonmoe.tools.profile_decode --device cuda --hidden 2048 --heads 16 --kv-heads 4 --layers 8 \\
        --experts 16 --top-k 2 --expert-ffn 1408 --dtype bfloat16 --tokens 64
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
               "cudaEventSynchronize")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonmoe.tools.profile_decode", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="mixtral")
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--experts-implementation", default=None, help="transformers' experts implementation")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="concurrent requests")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tritonmoe.backend.checkpoint import load_model, load_tokenizer
    from tritonmoe.backend.engine import Engine
    from tritonmoe.backend.sampling import SamplingParams
    from tritonmoe.tools import tiny_models

    print(f"command: python -m tritonmoe.tools.profile_decode {shlex.join(sys.argv[1:] if argv is None else argv)}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"machine: {platform.node()}, {gpu}, torch {torch.__version__}; date: "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    spec = tiny_models.TinySpec(arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads,
                                kv_heads=args.kv_heads, experts=args.experts, top_k=args.top_k,
                                expert_ffn=args.expert_ffn, dense_ffn=args.expert_ffn, dtype=args.dtype,
                                vocab=32000, shard_mb=2048)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_models.build(spec, Path(tmp) / "model", device=args.device)
        model = load_model(path, device, args.dtype, args.experts_implementation)
        tokenizer = load_tokenizer(path)
    # stepped on this thread (not engine.start()): the profiler records operators of the thread it runs on
    engine = Engine(model, tokenizer, max_num_seqs=max(8, args.batch))
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    prompt_ids = tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")

    def run() -> float:
        finished = []
        for _ in range(args.batch):
            engine.submit(prompt_ids, params, lambda out: out.finished and finished.append(out))
        t0 = time.perf_counter()
        while len(finished) < args.batch:
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()  # warm-up: kernels, allocator, cuBLAS handles
    plain = run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled = run()
    tokens = args.tokens  # decode steps (the batch shares them)
    print(f"\n{tokens} tokens x batch {args.batch}: {plain / tokens * 1e3:.2f} ms per step unprofiled, "
          f"{profiled / tokens * 1e3:.2f} ms profiled")
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    syncs = {e.key: e.count for e in events if e.key in SYNC_EVENTS}
    print(f"kernel launches per step: {launches / tokens:.0f}; synchronising calls per step: "
          + (", ".join(f"{k} {v / tokens:.1f}" for k, v in syncs.items()) or "none"))
    print("\nby host time (self):")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        print("\nby device time (self):")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
