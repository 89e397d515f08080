"""How much software time one on-demand expert fetch costs, beyond moving its bytes.

The cache is made to miss on every fetch (more experts than slots, visited round-robin), and the median time of
``acquire``/``wait_ready``/``release`` is compared with the median bare copy of the same bytes. On CUDA the copies
are asynchronous, so the CPU time per fetch *is* the software overhead (the figure MoE-Infinity's PR #98 puts at
~330 us per 17 MB copy, its stream synchronize included).

    python -m tritonmoe.backend.offload.timing --device cpu --expert-mib 1 --fetches 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .cache import ExpertCache
from .copy_engine import make_copy_engine
from .eviction import LRUEviction
from .host_store import HostExpertStore
from .layout import ExpertLayout, ExpertTensor
from .stats import OffloadStats


def measure_fetch_overhead(device: str = "cpu", expert_bytes: int = 1 << 20, fetches: int = 2000, slots: int = 4,
                           experts: int = 16, per_call: int = 1, api: str | None = None) -> dict:
    """``per_call`` experts are fetched per acquisition (a MoE layer's misses come together: top-k of them at
    batch 1); the figures are per expert. ``api``: the CUDA engine's cuda-python API (default: the engine's)."""
    device = torch.device(device)
    if per_call > slots // 2:
        slots = 2 * per_call  # the bare copies use the other half of the slots
    experts = max(experts, 4 * slots)
    layout = ExpertLayout((ExpertTensor("weight", (expert_bytes,), torch.uint8, 0),), expert_bytes)
    pin = device.type == "cuda"
    store = HostExpertStore(layout, [torch.randint(0, 255, (experts, expert_bytes), dtype=torch.uint8,
                                                   pin_memory=pin)])
    stats = OffloadStats(1)
    if api is not None and device.type == "cuda":
        from .cuda_copy_engine import CudaCopyEngine

        engine = CudaCopyEngine(device, slots, stats, api=api)
    else:
        engine = make_copy_engine(device, slots, stats)
    cache = ExpertCache(store, slots, device, LRUEviction(), engine, stats)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def fetch(i: int) -> float:
        want = [(i * per_call + j) % experts for j in range(per_call)]  # round-robin over more experts than slots
        t0 = time.perf_counter()
        got = cache.acquire(0, want).tolist()
        engine.wait_ready(got, 0)
        engine.release(got, 0)
        cache.release()
        return (time.perf_counter() - t0) / per_call

    def bare_copy(i: int) -> float:
        t0 = time.perf_counter()
        # other experts and slots than the fetch just used, so neither finds its bytes warm in the CPU caches
        for j in range(per_call):
            cache.pool[(i * per_call + j + slots // 2) % slots].copy_(
                store.buffer(0, (i * per_call + j + experts // 2) % experts), non_blocking=True)
        return (time.perf_counter() - t0) / per_call

    for i in range(2 * experts):  # warm-up: allocator, first touch, lazy CUDA state
        fetch(i), bare_copy(i)
    sync()
    # interleaved, and medians: a busy machine slows both alike instead of skewing one
    fetch_s, copy_s = [], []
    start = time.perf_counter()
    for i in range(fetches):
        fetch_s.append(fetch(i))
        copy_s.append(bare_copy(i))
    sync()
    wall = time.perf_counter() - start
    engine.close()  # also folds the GPU-timed stalls into the stats
    assert stats.misses[0] == stats.uses[0], "every fetch must miss for this measurement to mean anything"

    out = {"device": str(device), "expert_bytes": expert_bytes, "fetches": fetches, "per_call": per_call,
           "api": getattr(getattr(engine, "_calls", None), "api", None),
           "median_fetch_us": statistics.median(fetch_s) * 1e6,
           "median_bare_copy_us": statistics.median(copy_s) * 1e6,
           # every fetch is on demand, so the computation waits for each copy: stall ~ transfer time
           "stall_us_per_fetch": stats.stall_s[0] / ((fetches + 2 * experts) * per_call) * 1e6}
    if device.type == "cuda":
        # copies are asynchronous: the CPU time of a fetch is all software overhead
        out["overhead_us"] = out["median_fetch_us"]
        out["GBps_fetch_and_bare_together"] = 2 * fetches * per_call * expert_bytes / wall / 1e9
    else:
        out["overhead_us"] = out["median_fetch_us"] - out["median_bare_copy_us"]
    return out


def measure_primitives(calls: int = 2000) -> dict:
    """Median CPU time of each CUDA call the engine's hot path makes, through cuda-python's runtime and driver
    APIs, and of torch's two ways to get the current stream (ns per call): what a fetch's overhead is made of."""
    from cuda.bindings import runtime as cudart

    from .cuda_copy_engine import _Calls, _check_rt

    torch.cuda.init()
    index = torch.cuda.current_device()
    torch.empty(1, device="cuda")  # the primary context, current on this thread
    stream = _check_rt(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
    event = _check_rt(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming))
    src = torch.empty(4096, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(4096, dtype=torch.uint8, device="cuda")

    def median_ns(fn, sync_every: int = 0) -> float:
        times = []
        for i in range(calls):
            t0 = time.perf_counter_ns()
            fn()
            times.append(time.perf_counter_ns() - t0)
            if sync_every and i % sync_every == sync_every - 1:
                _check_rt(cudart.cudaStreamSynchronize(stream))
        _check_rt(cudart.cudaStreamSynchronize(stream))
        return float(statistics.median(times[calls // 10:]))

    out = {"torch.cuda.current_stream().cuda_stream": median_ns(lambda: torch.cuda.current_stream(index).cuda_stream)}
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        out["torch._C._cuda_getCurrentRawStream"] = median_ns(lambda: raw(index))
    for api in ("runtime", "driver"):
        c = _Calls(api)
        h = c.stream(int(stream))
        _check_rt(cudart.cudaEventRecord(event, stream))
        out[f"{api}: event record"] = median_ns(lambda: c.record(event, h))
        out[f"{api}: event query (done)"] = median_ns(lambda: c.query(event))
        out[f"{api}: stream wait event"] = median_ns(lambda: c.wait(h, event, 0))
        out[f"{api}: 4 KiB H2D copy, pinned"] = median_ns(lambda: c.copy(dst.data_ptr(), src.data_ptr(), 4096, h),
                                                          sync_every=256)
    _check_rt(cudart.cudaEventDestroy(event))
    _check_rt(cudart.cudaStreamDestroy(stream))
    return {k: round(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--expert-mib", type=float, default=1.0)
    p.add_argument("--fetches", type=int, default=2000)
    p.add_argument("--per-call", type=int, default=1, help="experts fetched per acquisition (a layer's misses)")
    p.add_argument("--api", choices=["driver", "runtime"], help="the CUDA engine's cuda-python API (default: its own)")
    p.add_argument("--primitives", action="store_true",
                   help="instead: the CPU time of each CUDA call of the hot path, runtime vs driver API (ns)")
    a = p.parse_args(argv)
    if a.primitives:
        print(json.dumps(measure_primitives()))
        return
    print(json.dumps(measure_fetch_overhead(a.device, int(a.expert_mib * 2**20), a.fetches, per_call=a.per_call,
                                            api=a.api)))


if __name__ == "__main__":
    main()
