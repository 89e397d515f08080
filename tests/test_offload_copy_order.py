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


def test_one_ready_event_per_batch_of_copies(monkeypatch):
    """A ``load_many`` of k experts issues k copies and one event record (not k); the compute stream then waits once
    per copy stream, and a slot reloaded on the other stream waits on its batch's event first."""
    sim = Sim(0)
    module = install(monkeypatch, sim)
    engine = engine_on(module, sim, monkeypatch, 6, OffloadStats(LAYERS), api="driver")
    store = _store(0)
    pool = torch.zeros((6, SLOT), dtype=torch.uint8)
    engine.bind(pool, store)
    sim.calls.clear()
    engine.load_many(np.array([0, 1, 2, 3]), 1, np.array([4, 5, 6, 7]), urgent=False)
    assert sim.calls.count("copy") == 4 and sim.calls.count("record") == 1 and sim.calls.count("wait") == 0
    engine.load_many(np.array([4, 5]), 2, np.array([0, 1]), urgent=True)
    sim.calls.clear()
    engine.wait_ready([0, 1, 2, 3, 4, 5], 1)
    # two timing records around one wait per copy stream
    assert sim.calls.count("wait") == 2 and sim.calls.count("record") == 2
    sim.calls.clear()
    engine.load_many(np.array([3]), 3, np.array([9]), urgent=True)  # slot 3's prefetch may still be in flight
    assert sim.calls == ["wait", "copy", "record"]
    sim.drain()
    for slot, (layer, expert) in enumerate([(1, 4), (1, 5), (1, 6), (3, 9), (2, 0), (2, 1)]):
        assert torch.equal(pool[slot], store.buffer(layer, expert)), slot
    assert engine.prefetches_in_flight() == 0
