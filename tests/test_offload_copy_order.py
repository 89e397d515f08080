"""The CUDA copy engine's ordering, checked on a simulated GPU (tests/cuda_sim.py: streams as queues run in random
interleavings; NOT a GPU test -- `pytest -m gpu tests/test_offload_cuda.py` is). A random workload goes through
the real ExpertCache and CudaCopyEngine the way the offloader drives them (acquire, prefetch pump, wait_ready, the
layer's kernels, release); every simulated kernel checks, when the GPU would run it, that each slot it reads holds
exactly the expert's bytes. A missing wait shows up as a kernel reading a slot whose copy has not landed or that a
later copy has already overwritten."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cuda_sim import Sim, engine_on, install
from tritonmoe.backend.offload.cache import ExpertCache
from tritonmoe.backend.offload.eviction import LFUEviction, LRUEviction
from tritonmoe.backend.offload.host_store import HostExpertStore
from tritonmoe.backend.offload.layout import ExpertLayout, ExpertTensor
from tritonmoe.backend.offload.stats import OffloadStats

LAYERS, EXPERTS, SLOT = 4, 12, 256


def _store(seed: int) -> HostExpertStore:
    gen = torch.Generator().manual_seed(seed)
    layout = ExpertLayout((ExpertTensor("weight", (SLOT,), torch.uint8, 0),), SLOT)
    return HostExpertStore(layout, [torch.randint(0, 256, (EXPERTS, SLOT), dtype=torch.uint8, generator=gen)
                                    for _ in range(LAYERS)])


def run_workload(monkeypatch, seed: int, api: str, num_slots: int, steps: int = 400, gpu_speed: int = 6,
                 eviction=LRUEviction, prefetch: bool = True, drop_waits: bool = False,
                 stale_write: str | None = None) -> tuple[Sim, list[str]]:
    """``stale_write``: a compute-stream kernel that zeroes the cache pool, queued "before" the engine is bound to
    it (the pool's memory was freed by work still pending there: what the caching allocator allows) or "after"
    (a write nothing orders the copies against: what the check must catch)."""
    sim = Sim(seed)
    if drop_waits:  # the engine's stream waits do nothing: what the check must catch
        sim.wait = lambda stream, event, flags=0: (0,)
    module = install(monkeypatch, sim)
    stats = OffloadStats(LAYERS)
    engine = engine_on(module, sim, monkeypatch, num_slots, stats, api=api)
    if stale_write is not None:
        bind = engine.bind

        def bind_beside_a_stale_write(pool, store):
            if stale_write == "after":
                bind(pool, store)
            for _ in range(8):  # the previous owner's kernels: the stale write comes late
                sim.kernel(lambda: None)
            sim.kernel(lambda: pool.zero_())
            if stale_write == "before":
                bind(pool, store)

        engine.bind = bind_beside_a_stale_write
    store = _store(seed)
    cache = ExpertCache(store, num_slots, torch.device("cpu"), eviction(), engine, stats)
    rng = np.random.default_rng(seed)
    errors: list[str] = []

    def kernel(slot: int, layer: int, expert: int, step: int):
        def check():
            if not torch.equal(cache.pool[slot], store.buffer(layer, expert)):
                errors.append(f"step {step}: slot {slot} does not hold expert {expert} of layer {layer}")
        return check

    for step in range(steps):
        layer = step % LAYERS
        want = rng.choice(EXPERTS, int(rng.integers(1, min(num_slots, 4) + 1)), replace=False)
        slots = cache.acquire(layer, want)
        if prefetch:  # the pump: a few experts of the next layers, behind this round's demand fetches
            if engine.prefetches_in_flight() < 3:
                nxt = np.array([(layer + 1) % LAYERS] * 3)
                cand = rng.choice(EXPERTS, 3, replace=False)
                keep = ~cache.resident_mask[nxt, cand]
                cache.prefetch_many(nxt[keep], cand[keep], 3)
        slot_list = slots.tolist()
        engine.wait_ready(slot_list, layer)
        for slot, expert in zip(slot_list, want.tolist()):
            sim.kernel(kernel(slot, layer, expert, step))
        engine.release(slot_list, layer)
        cache.release()
        sim.run(int(rng.integers(0, gpu_speed + 1)))  # the GPU gets some way through what it has been given
    sim.drain()
    return sim, errors


@pytest.mark.parametrize("api", ["driver", "runtime"])
@pytest.mark.parametrize("num_slots", [4, 6, 16])
@pytest.mark.parametrize("seed", range(6))
def test_every_kernel_reads_the_expert_it_asked_for_in_any_interleaving(monkeypatch, api, num_slots, seed):
    sim, errors = run_workload(monkeypatch, seed, api, num_slots)
    assert not errors, errors[:5]
    assert len(sim.copied_bytes) > 50  # the workload really moved experts (misses and prefetches)


def test_lfu_and_a_slow_gpu_keep_the_order_too(monkeypatch):
    for seed in range(4):
        _, errors = run_workload(monkeypatch, seed, "driver", 5, gpu_speed=1, eviction=LFUEviction)
        assert not errors, errors[:5]


def test_the_simulation_catches_a_missing_wait(monkeypatch):
    """The check can fail: drop the engine's waits on the copy streams (the released events) and on the compute
    stream (the ready events) and kernels read the wrong bytes."""
    assert any(run_workload(monkeypatch, seed, "driver", 4, steps=200, gpu_speed=3, drop_waits=True)[1]
               for seed in range(4))


@pytest.mark.parametrize("api", ["driver", "runtime"])
def test_copies_wait_for_work_queued_before_the_pool_was_bound(monkeypatch, api):
    """The pool's memory may still be written by kernels pending on the compute stream when the cache takes it;
    the copy streams (non-blocking) wait for those once, at bind: no kernel reads the stale write's zeros."""
    for seed in range(6):
        _, errors = run_workload(monkeypatch, seed, api, 6, steps=60, gpu_speed=1, stale_write="before")
        assert not errors, errors[:5]
    # the check can fail: a write queued after the bind is ordered against nothing, and kernels read its zeros
    assert any(run_workload(monkeypatch, seed, api, 6, steps=60, gpu_speed=1, stale_write="after")[1]
               for seed in range(6))
