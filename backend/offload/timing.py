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
                           experts: int = 16) -> dict:
    device = torch.device(device)
    layout = ExpertLayout((ExpertTensor("weight", (expert_bytes,), torch.uint8, 0),), expert_bytes)
    pin = device.type == "cuda"
    store = HostExpertStore(layout, [torch.randint(0, 255, (experts, expert_bytes), dtype=torch.uint8,
                                                   pin_memory=pin)])
    stats = OffloadStats(1)
    engine = make_copy_engine(device, slots, stats)
    cache = ExpertCache(store, slots, device, LRUEviction(), engine, stats)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def fetch(i: int) -> float:
        t0 = time.perf_counter()
        got = cache.acquire(0, [i % experts]).tolist()
        engine.wait_ready(got, 0)
        engine.release(got, 0)
        cache.release()
        return time.perf_counter() - t0

    def bare_copy(i: int) -> float:
        t0 = time.perf_counter()
        # another expert and slot than the fetch just used, so neither finds its bytes warm in the CPU caches
        cache.pool[(i + slots // 2) % slots].copy_(store.buffer(0, (i + experts // 2) % experts), non_blocking=True)
        return time.perf_counter() - t0

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

    out = {"device": str(device), "expert_bytes": expert_bytes, "fetches": fetches,
           "median_fetch_us": statistics.median(fetch_s) * 1e6,
           "median_bare_copy_us": statistics.median(copy_s) * 1e6,
           # every fetch is on demand, so the computation waits for each copy: stall ~ transfer time
           "stall_us_per_fetch": stats.stall_s[0] / (fetches + 2 * experts) * 1e6}
    if device.type == "cuda":
        # copies are asynchronous: the CPU time of a fetch is all software overhead
        out["overhead_us"] = out["median_fetch_us"]
        out["GBps_fetch_and_bare_together"] = 2 * fetches * expert_bytes / wall / 1e9
    else:
        out["overhead_us"] = out["median_fetch_us"] - out["median_bare_copy_us"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--expert-mib", type=float, default=1.0)
    p.add_argument("--fetches", type=int, default=2000)
    a = p.parse_args(argv)
    print(json.dumps(measure_fetch_overhead(a.device, int(a.expert_mib * 2**20), a.fetches)))


if __name__ == "__main__":
    main()
