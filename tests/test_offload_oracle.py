"""Belady's MIN on replayed routing (tools/offload_oracle): its LRU is the real cache's LRU, its MIN is optimal on
sequences small enough to search, and no real eviction policy keeps more than it."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonmoe.backend.offload import HostExpertStore
from tritonmoe.backend.offload.cache import ExpertCache
from tritonmoe.backend.offload.copy_engine import SyncCopyEngine
from tritonmoe.backend.offload.eviction import make_eviction_policy
from tritonmoe.backend.offload.stats import OffloadStats
from tritonmoe.tools.offload_oracle import Sequence, main, replay_sequence, simulate

from test_offload_cache import FakeExperts

LAYERS, EXPERTS = 4, 6


def random_sequence(seed: int, requests: int, max_per_layer: int) -> Sequence:
    """Layer after layer, each request a random set of one layer's experts; all counted."""
    rng = np.random.default_rng(seed)
    cells = []
    for t in range(requests):
        layer = t % LAYERS
        n = int(rng.integers(1, max_per_layer + 1))
        cells.append(np.sort(rng.choice(EXPERTS, n, replace=False)) + layer * EXPERTS)
    return Sequence(cells, [True] * requests, LAYERS * EXPERTS)


def real_cache_hits(seq: Sequence, slots: int, eviction: str) -> int:
    """The offloader's cache, demand fetches only, driven as the offloader drives it (a layer's resident experts
    first, then the missing ones, each by expert id)."""
    modules = [FakeExperts(seed=i) for i in range(LAYERS)]
    store = HostExpertStore.from_experts_modules(modules, pin=False)
    stats = OffloadStats(LAYERS)
    cache = ExpertCache(store, slots, torch.device("cpu"), make_eviction_policy(eviction), SyncCopyEngine(stats),
                        stats)
    for cells in seq.cells:
        layer, experts = int(cells[0]) // EXPERTS, cells % EXPERTS
        resident = cache.resident_mask[layer, experts]
        ordered = np.concatenate([experts[resident], experts[~resident]])
        for start in range(0, len(ordered), slots):  # rounds, as the offloader runs a layer larger than the cache
            cache.acquire(layer, ordered[start:start + slots])
            cache.release()
    return int(stats.hits.sum())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(2, 20), per_layer=st.integers(1, EXPERTS))
def test_lru_equals_the_real_caches_lru(seed, slots, per_layer):
    """Layers needing more experts than the cache holds included: both run them in rounds."""
    seq = random_sequence(seed, 60, per_layer)
    assert simulate(seq, slots, "lru")["hits"] == real_cache_hits(seq, slots, "lru")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), slots=st.integers(3, 20))
def test_min_keeps_at_least_what_any_real_policy_keeps(seed, slots):
    seq = random_sequence(seed, 60, min(3, slots))
    best = simulate(seq, slots, "min")["hits"]
    assert best >= real_cache_hits(seq, slots, "lru") and best >= real_cache_hits(seq, slots, "lfu")


def fewest_misses(seq: Sequence, capacity: int) -> int:
    """Exhaustive search over every eviction choice."""
    @functools.lru_cache(maxsize=None)
    def go(t: int, resident: frozenset) -> int:
        if t == len(seq.cells):
            return 0
        need = set(seq.cells[t].tolist())
        missing = need - resident
        over = len(resident) + len(missing) - capacity
        options = [()] if over <= 0 else itertools.combinations(sorted(resident - need), over)
        return len(missing) + min(go(t + 1, frozenset((resident - set(out)) | need)) for out in options)

    return go(0, frozenset())


@pytest.mark.parametrize("seed", range(6))
def test_min_is_optimal_on_sequences_small_enough_to_search(seed):
    seq = random_sequence(seed, 14, 2)
    for capacity in (2, 3, 5):
        r = simulate(seq, capacity, "min")
        assert r["uses"] - r["hits"] == fewest_misses(seq, capacity)


def test_min_ranks_far_above_lru_on_a_cyclic_sequence():
    """A loop one expert longer than the cache: LRU misses every time, MIN keeps all but one."""
    cells = [np.array([e]) for e in list(range(5)) * 6]
    seq = Sequence(cells, [True] * len(cells), 5)
    assert simulate(seq, 4, "lru")["hits"] == 0
    assert simulate(seq, 4, "min")["hits"] >= 15


def test_a_layer_larger_than_the_cache_runs_in_rounds_and_unknown_policies_are_refused():
    seq = Sequence([np.arange(5), np.arange(5)], [True, True], 6)
    r = simulate(seq, 4, "min")
    assert r["uses"] == 10 and r["hits"] == 4  # the second pass finds what the cache kept: a full round
    with pytest.raises(ValueError, match="'min' or 'lru'"):
        simulate(seq, 8, "lfu")


def test_replay_sequence_is_the_benchmarks_order():
    """Per group: every layer's prefill union, then per decode step every layer's union over the batch; the
    warm-up group runs ``warmup_tokens`` steps and only later groups count."""
    from tritonmoe.tools.bench_offload import SyntheticTraces

    t = SyntheticTraces(layers=3, num_experts=8, top_k=2, requests=12, prompt_len=5, gen_len=4)
    groups = [[0, 1], [2, 3]]
    seq = replay_sequence(t, groups, new_tokens=4, warmup=1, warmup_tokens=2)
    assert len(seq.cells) == 3 + 2 * 3 + 3 + 4 * 3
    assert seq.counted == [False] * (3 + 6 + 3) + [True] * 12
    np.testing.assert_array_equal(seq.cells[1], np.unique(t.experts[[0, 1], 1, :5]) + 8)
    np.testing.assert_array_equal(seq.cells[-1], np.unique(t.experts[[2, 3], 2, 5 + 3]) + 16)


def test_replay_sequence_of_uint8_traces_keeps_ids_past_255():
    """Trace files store expert ids as uint8; a cell id is ``layer * E + expert``, past 255 from the fifth layer of
    64 experts. Under numpy 2's promotion a uint8 array plus a Python int stays uint8 and overflows (found on the
    H200, whose numpy is 2.5): the cells must be int64 whatever numpy promotes to."""
    from tritonmoe.tools.bench_offload import SyntheticTraces

    t = SyntheticTraces(layers=6, num_experts=64, top_k=2, requests=4, prompt_len=5, gen_len=3)
    t.experts = t.experts.astype(np.uint8)
    seq = replay_sequence(t, [[0, 1]], new_tokens=3, warmup=0, warmup_tokens=None)
    assert all(c.dtype == np.int64 for c in seq.cells)
    np.testing.assert_array_equal(seq.cells[5], np.unique(t.experts[[0, 1], 5, :5]).astype(np.int64) + 5 * 64)
    np.testing.assert_array_equal(seq.cells[-1], np.unique(t.experts[[0, 1], 5, 5 + 2]).astype(np.int64) + 5 * 64)


def test_cli_reports_min_above_lru_and_a_transfer_floor(tmp_path, capsys):
    import json

    from tritonmoe.tools.bench_offload import SyntheticTraces

    t = SyntheticTraces(layers=4, num_experts=16, top_k=2, requests=24, prompt_len=16, gen_len=6)
    path = tmp_path / "traces.npz"
    np.savez(path, experts=t.experts, lookahead=t.lookahead, lookahead_prefill=t.lookahead_prefill,
             category=t.category, split=t.split, prompt_len=t.prompt_len, gen_len=t.gen_len,
             num_experts=t.num_experts, meta=json.dumps(t.meta))
    out = tmp_path / "oracle.json"
    assert main(["--traces", str(path), "--batch", "1", "2", "--budgets", "25", "50", "--new-tokens", "6",
                 "--groups-b1", "2", "--slot-mib", "8", "--gbps", "50", "--out", str(out)]) == 0
    rows = json.load(open(out))["results"]
    assert len(rows) == 4 and "| batch | budget |" in capsys.readouterr().out
    for r in rows:
        assert 0.0 <= r["lru_decode_hit_rate"] <= r["min_decode_hit_rate"] <= 1.0
        assert r["min_transfer_ms"] == pytest.approx(r["min_moved_per_step"] * 8 * 2**20 / 50e9 * 1e3)


def test_floor_plot_of_a_bench_file(tmp_path):
    from tritonmoe.tools.offload_oracle import plot_floor

    bench = {"env": {"h2d": {"pinned_GBps": 50.0}, "device": "test"},
             "results": [{"shape": "s", "batch": 2, "budget_pct": 25, "policy": p, "tpot_s": 0.1, "slot_bytes": 2**20,
                          "decode_demand_bytes_per_step": 4e9, "decode_prefetch_bytes_per_step": 1e9}
                         for p in ("lru", "lookahead")]}
    rows = [{"batch": 2, "budget_pct": 25, "min_moved_per_step": 1000.0}]
    path = plot_floor(bench, rows, str(tmp_path / "floor.png"))
    assert (tmp_path / "floor.png").stat().st_size > 10_000 and path.endswith("floor.png")
    with pytest.raises(ValueError, match="no batch > 1 rows"):
        plot_floor(bench, [{"batch": 8, "budget_pct": 25, "min_moved_per_step": 1.0}], str(tmp_path / "x.png"))
