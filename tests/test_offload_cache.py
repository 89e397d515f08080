"""The device expert cache on the CPU path: layout, slots, eviction policies, protection, prefetch, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonmoe.backend.offload import ExpertBudget, ExpertLayout, HostExpertStore
from tritonmoe.backend.offload.cache import ExpertCache
from tritonmoe.backend.offload.copy_engine import SyncCopyEngine
from tritonmoe.backend.offload.eviction import make_eviction_policy
from tritonmoe.backend.offload.layout import SLOT_ALIGN, TENSOR_ALIGN
from tritonmoe.backend.offload.prefetch import PrefetchQueue
from tritonmoe.backend.offload.stats import OffloadStats

LAYERS, EXPERTS = 4, 6


class FakeExperts(torch.nn.Module):
    """The shape transformers' fused experts modules have: per-expert params with the expert first."""

    def __init__(self, seed: int, experts: int = EXPERTS, hidden: int = 8, ffn: int = 5, bias: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_experts = experts
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * ffn, hidden, generator=g))
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, ffn, generator=g))
        if bias:
            self.down_proj_bias = torch.nn.Parameter(torch.randn(experts, hidden, generator=g))
        self.router_scale = torch.nn.Parameter(torch.ones(3))  # not per expert: stays out of the layout


class FakePredictor:
    def __init__(self):
        self.prediction = np.zeros((LAYERS, EXPERTS))


def make_cache(slots: int, eviction: str = "lru", predictor=None):
    modules = [FakeExperts(seed=i) for i in range(LAYERS)]
    store = HostExpertStore.from_experts_modules(modules, pin=False)
    stats = OffloadStats(LAYERS)
    cache = ExpertCache(store, slots, torch.device("cpu"), make_eviction_policy(eviction, predictor),
                        SyncCopyEngine(stats), stats)
    return cache, modules, stats


def slot_contents(cache, slot):
    return {name: view[slot] for name, view in cache.views.items()}


def test_layout_packs_each_expert_into_one_aligned_buffer():
    module = FakeExperts(seed=0, bias=True)
    layout = ExpertLayout.of_experts_module(module)
    assert layout.names == ("gate_up_proj", "down_proj", "down_proj_bias")
    assert all(t.offset % TENSOR_ALIGN == 0 for t in layout.tensors)
    assert layout.slot_bytes % SLOT_ALIGN == 0
    assert layout.slot_bytes >= sum(t.nbytes for t in layout.tensors)
    buf = torch.zeros((EXPERTS, layout.slot_bytes), dtype=torch.uint8)
    layout.pack(module, buf)
    for e in range(EXPERTS):
        views = layout.views(buf[e])  # one expert's buffer, on its own
        for name in layout.names:
            assert torch.equal(views[name], getattr(module, name)[e])


def test_host_store_rejects_mismatched_buffers():
    layout = ExpertLayout.of_experts_module(FakeExperts(seed=0))
    with pytest.raises(ValueError, match="shape"):
        HostExpertStore(layout, [torch.zeros((EXPERTS, layout.slot_bytes + 1), dtype=torch.uint8)])
    with pytest.raises(ValueError, match="different expert layout"):
        HostExpertStore.from_experts_modules([FakeExperts(seed=0), FakeExperts(seed=1, ffn=7)], pin=False)


def test_budget_of_one_expert_per_layer():
    cache, _, _ = make_cache(1)
    slot_bytes = cache.store.layout.slot_bytes
    assert ExpertBudget(nbytes=LAYERS * slot_bytes).slots(slot_bytes, LAYERS * EXPERTS) == LAYERS
    assert cache.pool.shape == (1, slot_bytes)


def test_acquire_loads_the_right_bytes_and_counts():
    cache, modules, stats = make_cache(3)
    slots = cache.acquire(2, [4, 1])
    for slot, expert in zip(slots, [4, 1]):
        assert torch.equal(slot_contents(cache, slot)["down_proj"], modules[2].down_proj[expert])
    cache.release()
    cache.acquire(2, [1])
    assert (stats.uses[2], stats.hits[2], stats.misses[2]) == (3, 1, 2)
    assert stats.demand_bytes[2] == 2 * cache.store.layout.slot_bytes


def test_lru_evicts_least_recently_used():
    cache, _, _ = make_cache(3, "lru")
    for e in (0, 1, 2):
        cache.acquire(0, [e]); cache.release()
    cache.acquire(0, [0]); cache.release()  # 1 is now the least recently used
    cache.acquire(0, [3]); cache.release()
    assert sorted(cache.resident()) == [(0, 0), (0, 2), (0, 3)]


def test_lfu_evicts_least_frequently_used_with_lru_tiebreak():
    cache, _, _ = make_cache(3, "lfu")
    for e in (0, 0, 0, 1, 2, 2):
        cache.acquire(0, [e]); cache.release()
    cache.acquire(0, [3]); cache.release()  # expert 1 was used once
    assert (0, 1) not in cache
    cache.acquire(0, [4]); cache.release()  # 3 and 4 both once... 3 is the older of the least used
    assert (0, 3) not in cache and (0, 4) in cache


def test_activation_aware_evicts_lowest_predicted_score():
    predictor = FakePredictor()
    cache, _, _ = make_cache(3, "activation", predictor)
    # same probability everywhere: the later layer has the lower (1 - i/L) factor and goes first
    predictor.prediction[:] = 1.0
    for key in [(0, 0), (3, 1), (1, 2)]:
        cache.acquire(key[0], [key[1]]); cache.release()
    cache.acquire(2, [5]); cache.release()
    assert (3, 1) not in cache
    # within a layer the least likely expert goes, whatever its recency
    predictor.prediction[1] = [0, 0, 5.0, 0, 0, 0]
    predictor.prediction[0] = [0.1, 0, 0, 0, 0, 0.9]
    predictor.prediction[2] = [0, 0, 0, 0, 0, 1.0]
    # scores: (0, 0): 0.1 * 1 = 0.1; (1, 2): 1 * 0.75; (2, 5): 1 * 0.5
    cache.acquire(0, [0]); cache.release()  # most recent, but p = 0.1 in layer 0
    cache.acquire(1, [4]); cache.release()
    assert (0, 0) not in cache and (1, 2) in cache and (2, 5) in cache


def test_activation_aware_without_the_depth_factor_ranks_layers_alike():
    from tritonmoe.backend.offload.eviction import ActivationAwareEviction

    predictor = FakePredictor()
    predictor.prediction[:] = 1.0
    weighted, flat = ActivationAwareEviction(predictor), ActivationAwareEviction(predictor, depth_weighted=False)
    layers, experts = np.array([0, 3]), np.array([1, 1])
    w, f = weighted.values(layers, experts), flat.values(layers, experts)
    assert w[0] > w[1]  # the paper's (1 - i/L): the early layer is kept
    assert f[0] == f[1] and np.isclose(f[0], w[0])  # flat: p / row sum alone, as layer 0's weighted score
    predictor.prediction[3, 1] = 4.0  # now the late layer's expert is the likelier one
    assert flat.values(layers, experts)[1] > flat.values(layers, experts)[0]


def test_the_frequency_prior_adds_each_layers_use_shares_to_the_prediction():
    """``frequency_weight`` w: the score is the prediction's plus w x (this expert's uses / its layer's uses); with
    an uninformative prediction the often-used expert is kept over a more recent, rarely used one."""
    from tritonmoe.backend.offload.eviction import ActivationAwareEviction

    predictor = FakePredictor()
    predictor.version = 0  # a prediction that says when it changes: values_state can tell
    plain = ActivationAwareEviction(predictor, depth_weighted=False)
    prior = ActivationAwareEviction(predictor, depth_weighted=False, frequency_weight=2.0)
    for experts in ([1, 2], [1], [1, 3]):
        prior.on_use(0, np.array(experts))
    prior.on_use(2, np.array([4]))
    layers, experts = np.array([0, 0, 0, 0, 2, 2]), np.array([1, 2, 3, 0, 4, 0])
    shares = np.array([3 / 5, 1 / 5, 1 / 5, 0, 1, 0])
    assert np.allclose(prior.values(layers, experts), plain.values(layers, experts) + 2.0 * shares)
    before = prior.values_state()
    prior.on_use(0, np.array([0]))
    assert prior.values_state() != before and prior.values(layers, experts)[3] > 0  # a use changes the scores

    predictor = FakePredictor()
    cache, _, _ = make_cache(2, "lru")
    cache.eviction = ActivationAwareEviction(predictor, depth_weighted=False, frequency_weight=2.0)
    for _ in range(2):
        cache.acquire(1, [3]); cache.release()  # layer 1's uses go mostly to expert 3
    for _ in range(3):
        cache.acquire(0, [0]); cache.release()  # (0, 0): all of layer 0's uses, long ago
    cache.acquire(1, [1]); cache.release()  # (1, 1): a third of layer 1's uses, recently
    cache.acquire(2, [2]); cache.release()
    assert (0, 0) in cache and (1, 1) not in cache  # LRU (or the prediction alone) would evict (0, 0)


def test_the_frequency_prior_forgets_with_its_half_life():
    """``frequency_half_life`` H: a use weighs ``0.5 ** (k / H)`` after k later uses of its layer, so when the mix
    shifts from expert 1 to expert 2 the prior follows; without it (0) both keep half; other layers' uses do not
    age a layer's."""
    from tritonmoe.backend.offload.eviction import ActivationAwareEviction, make_eviction_policy

    predictor = FakePredictor()
    predictor.version = 0
    plain = ActivationAwareEviction(predictor, depth_weighted=False)
    keeping = ActivationAwareEviction(predictor, depth_weighted=False, frequency_weight=1.0)
    forgetting = make_eviction_policy("auto", predictor, False, 1.0, 4.0).activation
    for policy in (keeping, forgetting):
        for expert in [1] * 8 + [2] * 8:  # the old mix, then the new one
            policy.on_use(0, np.array([expert]))
    layers, experts = np.array([0, 0]), np.array([1, 2])
    assert np.allclose(keeping.values(layers, experts) - plain.values(layers, experts), [0.5, 0.5])
    g = 0.5 ** (1 / 4)
    old, new = sum(g ** j for j in range(8, 16)), sum(g ** j for j in range(8))
    shares = forgetting.values(layers, experts) - plain.values(layers, experts)
    assert np.allclose(shares, [old / (old + new), new / (old + new)]) and shares[1] == pytest.approx(0.8)  # 1/(1+g^8)
    for _ in range(20):
        forgetting.on_use(2, np.array([0]))
    assert np.allclose(forgetting.values(layers, experts) - plain.values(layers, experts), shares)


def test_activation_aware_admission_refuses_prefetch_below_residents():
    predictor = FakePredictor()
    cache, _, stats = make_cache(2, "activation", predictor)
    predictor.prediction[0] = [1, 1, 0, 0, 0, 0]
    cache.acquire(0, [0, 1]); cache.release()
    assert not cache.prefetch((3, 5))  # predicted 0 in a late layer: not worth either resident
    predictor.prediction[3] = [0, 0, 0, 0, 0, 10]
    predictor.prediction[0] = [0, 1, 0, 0, 0, 0]  # expert 0 of layer 0 is no longer expected
    assert cache.prefetch((3, 5))
    assert (0, 0) not in cache and stats.prefetches[3] == 1


def test_protected_slots_survive_the_rest_of_their_round():
    cache, _, _ = make_cache(2, "lru")
    cache.acquire(0, [0]); cache.release()
    slots = cache.acquire(1, [0, 1])  # needs both slots: the resident (0, 0) is evicted, nothing protected is
    assert sorted(cache.resident()) == [(1, 0), (1, 1)] and len(set(slots)) == 2
    assert not cache.prefetch((2, 0))  # every slot protected until release
    cache.release()
    assert cache.prefetch((2, 0))
    with pytest.raises(ValueError, match="cannot be resident at once"):
        cache.acquire(0, [0, 1, 2])


def test_prefetch_statistics():
    cache, _, stats = make_cache(2, "lru")
    queue = PrefetchQueue(cache, window=8)
    # three prefetches for two free slots: one pump's prefetches never evict each other, so the third waits
    queue.replace([(1, 0), (1, 1), (2, 2)])
    queue.pump()
    assert len(queue) == 1 and stats.prefetches.tolist() == [0, 2, 0, 0] and (2, 2) not in cache
    queue.pump()  # the next pump evicts the least recent unused prefetch for it
    assert len(queue) == 0
    assert stats.prefetches.tolist() == [0, 2, 1, 0] and (1, 0) not in cache and (1, 1) in cache
    assert stats.prefetches_wasted.tolist() == [0, 1, 0, 0]
    cache.acquire(2, [2]); cache.release()
    s = stats.as_dict()
    assert (s["hits"], s["prefetches_used"], s["prefetch_precision"], s["prefetch_recall"]) == (1, 1, 0.5, 1.0)
    assert s["prefetch_bytes"] == 3 * cache.store.layout.slot_bytes and s["demand_bytes"] == 0


def test_refused_prefetch_is_skipped_not_the_rest():
    """Activation-aware admission: a queued expert ranked below every evictable one is skipped, and the next in
    the queue still goes in over the lowest victim."""
    predictor = FakePredictor()
    cache, _, stats = make_cache(2, "activation", predictor)
    predictor.prediction[0] = [1, 0.5, 0, 0, 0, 0]
    predictor.prediction[1] = [0, 0, 0, 0, 0, 10]
    cache.acquire(0, [0, 1]); cache.release()
    queue = PrefetchQueue(cache, window=1)
    queue.replace([(3, 2), (1, 5)])  # (3, 2): predicted 0, refused; (1, 5) outranks (0, 1)
    queue.pump()
    assert (3, 2) not in cache and (1, 5) in cache and (0, 1) not in cache and (0, 0) in cache
    assert stats.prefetches.tolist() == [0, 1, 0, 0] and len(queue) == 0


def test_prefetch_window_limits_each_pump():
    cache, _, stats = make_cache(6, "lru")
    queue = PrefetchQueue(cache, window=2)
    queue.replace([(0, e) for e in range(5)])
    queue.pump()
    assert sum(stats.prefetches) == 2 and len(queue) == 3


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 8), eviction=st.sampled_from(["lru", "lfu", "activation"]),
       steps=st.lists(st.tuples(st.integers(0, LAYERS - 1), st.sets(st.integers(0, EXPERTS - 1), min_size=1,
                                                                     max_size=3),
                                st.lists(st.tuples(st.integers(0, LAYERS - 1), st.integers(0, EXPERTS - 1)),
                                         max_size=3)),
                      min_size=1, max_size=25))
def test_cache_invariants(slots, eviction, steps):
    """Whatever the sequence of acquires and prefetches: slots hold exactly the experts the cache says, never
    more than fit, and the counters add up."""
    predictor = FakePredictor()
    predictor.prediction[:] = np.random.default_rng(slots).random((LAYERS, EXPERTS))
    cache, modules, stats = make_cache(slots, eviction, predictor)
    queue = PrefetchQueue(cache, window=2)
    uses = 0
    for layer, experts, prefetches in steps:
        experts = sorted(experts)[:slots]
        got = cache.acquire(layer, experts)
        uses += len(experts)
        assert len(set(got)) == len(experts)
        for slot, e in zip(got, experts):
            assert torch.equal(slot_contents(cache, slot)["gate_up_proj"], modules[layer].gate_up_proj[e])
        cache.release()
        queue.replace(prefetches)
        queue.pump()
        assert len(cache.resident()) <= slots
    s = stats.as_dict()
    assert s["hits"] + s["misses"] == s["uses"] == uses
    assert s["prefetches_used"] + s["prefetches_wasted"] <= s["prefetches"]
    assert s["bytes_moved"] == (s["misses"] + s["prefetches"]) * cache.store.layout.slot_bytes
    assert 0.0 <= s["hit_rate"] <= 1.0


def test_fetch_overhead_helper_measures_misses():
    from tritonmoe.backend.offload.timing import measure_fetch_overhead

    out = measure_fetch_overhead("cpu", expert_bytes=64 * 1024, fetches=100)
    assert out["fetches"] == 100 and out["median_fetch_us"] > 0 and out["median_bare_copy_us"] > 0
    assert out["stall_us_per_fetch"] > 0  # on-demand copies on the CPU path are stalls by definition


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(0, 3), min_size=1, max_size=40), data=st.data())
def test_lowest_first_is_the_value_then_recency_order(values, data):
    """One selection of n victims equals n one-at-a-time choices: lowest value first, ties least recent first."""
    from tritonmoe.backend.offload.eviction import lowest_first

    values = np.array(values, dtype=float)
    ticks = np.array(data.draw(st.permutations(range(len(values)))))  # the cache's ticks are distinct
    n = data.draw(st.integers(1, len(values)))
    assert lowest_first(values, ticks, n).tolist() == np.lexsort((ticks, values))[:n].tolist()


def test_one_layer_with_many_misses_evicts_what_single_misses_would():
    """LFU over two rounds: the experts a layer needs at once replace the least used residents, least recent
    first among equals, as single acquisitions would."""
    cache, _, _ = make_cache(4, "lfu")
    for e in (0, 0, 1, 2, 2, 3):
        cache.acquire(0, [e]); cache.release()
    # uses: 0 -> 2, 1 -> 1, 2 -> 2, 3 -> 1; two misses at once evict 1 then 3 (both used once, 1 older)
    cache.acquire(1, [0, 1]); cache.release()
    assert sorted(cache.resident()) == [(0, 0), (0, 2), (1, 0), (1, 1)]
