"""The host-time optimisations of the offloader must not change what it decides.

``offload_reference`` is the offloader as of commit fb8f032 (cache, policies, EAM matching, prefetch planning),
verbatim. Both it and the current code are driven with the same routing (clustered, so the EAMC prediction is
not flat and the activation scores have both ties and distinct values), the same hidden states and the same EAMC
history; every copy either issues (demand or prefetch: slots, layers, experts, in order), every layer's output, the
statistics and the final cache contents must be equal. The copy engine reports prefetches in flight either never
(the CPU engine) or as a deterministic function of the prefetches issued so far (a GPU engine's window is often
partly busy), so both the full-window and the partial-window paths of the prefetch pump are exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_reference import offloader as reference
from tritonmoe.backend.offload import HostExpertStore, OffloadConfig
from tritonmoe.backend.offload import offloader as current


class RecordingEngine:
    """Wraps a copy engine: records every ``load_many``; ``in_flight="partial"`` reports some prefetches busy."""

    def __init__(self, inner, in_flight: str):
        self.inner, self.in_flight, self.calls, self.loaded = inner, in_flight, [], 0

    def load_many(self, slots, layers, experts, urgent):
        n = len(slots)
        layers_list = np.broadcast_to(np.asarray(layers), (n,)).tolist()
        self.calls.append((bool(urgent), np.asarray(slots).tolist(), layers_list, np.asarray(experts).tolist()))
        self.loaded += n
        return self.inner.load_many(slots, layers, experts, urgent)

    def prefetches_in_flight(self):
        return 0 if self.in_flight == "none" else self.loaded % 4  # 0..3 of a window of 3: full at times

    def __getattr__(self, name):
        return getattr(self.inner, name)


class TopKRouter(torch.nn.Module):
    """For router lookahead: a fixed random linear router, returning ``(logits, weights, top_k_index)``."""

    def __init__(self, hidden: int, experts: int, top_k: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden, generator=g), requires_grad=False)
        self.top_k = top_k

    def forward(self, hidden_states):
        logits = hidden_states @ self.weight.T
        w, idx = torch.topk(logits, self.top_k, dim=-1)
        return logits, w, idx


def experts_modules(layers: int, experts: int, hidden: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=8, num_experts=experts, num_experts_per_tok=2,
                         num_hidden_layers=layers)
    torch.manual_seed(0)
    modules = []
    for _ in range(layers):
        m = Qwen3MoeExperts(cfg)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.1)
        modules.append(m.requires_grad_(False))
    return modules


def clustered_routing(requests: int, layers: int, experts: int, top_k: int, tokens: int, clusters: int = 3,
                      seed: int = 0) -> np.ndarray:
    """``[R, L, T, k]`` expert ids: requests of a cluster share skewed preferences (as SyntheticTraces)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.5, (clusters, layers, experts))
    out = np.empty((requests, layers, tokens, top_k), dtype=np.int64)
    for r in range(requests):
        logits = centres[r % clusters] + rng.normal(0.0, 1.0, (layers, experts))
        noisy = logits[:, None, :] + rng.gumbel(size=(layers, tokens, experts))
        out[r] = np.sort(np.argpartition(-noisy, top_k - 1, axis=-1)[..., :top_k], axis=-1)
    return out


def drive(module, modules, store, routers, cfg: OffloadConfig, routing, groups, prompt_len, hidden, in_flight,
          feed: dict | None = None, check=None):
    """Run ``groups`` (lists of request indices; each group prefills, decodes, finishes) through an offloader of
    ``module``; returns what it decided. ``feed``: filled with each forward's routing per layer before each layer
    runs (for :class:`OracleRouter`); ``check(off, layer, next_layer_picks)`` runs after each layer."""
    off = module.Offloader(cfg, store, torch.device("cpu"), routers)
    off.set_prefetch_window(3)
    engine = RecordingEngine(off.cache.engine, in_flight)
    off.cache.engine = engine
    gen = torch.Generator().manual_seed(1)
    outputs, plans = [], []
    L, k = routing.shape[1], routing.shape[3]
    with torch.no_grad():
        for gi, group in enumerate(groups):
            seq_ids = [f"g{gi}r{r}" for r in group]
            B = len(group)
            phases = [("prefill", slice(0, prompt_len))] + [("decode", slice(t, t + 1))
                                                             for t in range(prompt_len, routing.shape[2])]
            for phase, span in phases:
                off.begin_forward(seq_ids, phase)
                rows = span.stop - span.start
                x = torch.randn(B * rows, hidden, generator=gen)
                w = torch.rand(B * rows, k, generator=gen)
                now = {i: torch.as_tensor(routing[group, i, span].reshape(B * rows, k)) for i in range(L)}
                for layer in range(L):
                    if feed is not None:
                        feed.clear()
                        feed.update(now)
                    outputs.append(off.run_experts(layer, modules[layer], x, now[layer], w))
                    plans.append((off.prefetch_queue._layers.tolist(), off.prefetch_queue._experts.tolist()))
                    if check is not None:
                        check(off, layer, now.get(layer + 1))
            for s in seq_ids:
                off.end_sequence(s)
    stats = off.stats()
    for key in ("host_s", "stall_s"):
        stats.pop(key)
        stats["per_layer"].pop(key)
    prediction = None if off.predictor is None else off.predictor.prediction.copy()
    return dict(calls=engine.calls, outputs=outputs, plans=plans, stats=stats, slot_of=off.cache.slot_of.copy(),
                prediction=prediction, eamc=off.eamc.eams.copy())


def compare(a, b):
    assert len(a["calls"]) == len(b["calls"])
    for i, (x, y) in enumerate(zip(a["calls"], b["calls"])):
        assert x == y, f"copy {i} differs: reference {x}, current {y}"
    assert a["plans"] == b["plans"]
    assert len(a["outputs"]) == len(b["outputs"])
    for x, y in zip(a["outputs"], b["outputs"]):
        assert torch.equal(x, y)
    assert a["stats"] == b["stats"]
    assert np.array_equal(a["slot_of"], b["slot_of"])
    if a["prediction"] is not None:
        assert np.array_equal(a["prediction"], b["prediction"])
    assert np.array_equal(a["eamc"], b["eamc"])


SMALL = dict(layers=6, experts=16, top_k=4, hidden=16, prompt_len=6, decode=10)
# (activation-aware eviction with the lookahead prefetch is not here: its eviction reads the lookahead-refined
# prediction since, which the reference did not have -- test_lookahead_refines_what_activation_eviction_reads)
POLICIES = [("activation", "activation"), ("activation", "none"), ("lru", "activation"), ("lfu", "activation"),
            ("lru", "none"), ("lfu", "none"), ("lru", "lookahead")]


def run_case(shape, eviction, prefetch, budget, batch, in_flight, capacity=5, top_matches=2, requests=14):
    L, E, k, H = shape["layers"], shape["experts"], shape["top_k"], shape["hidden"]
    modules = experts_modules(L, E, H)
    store = HostExpertStore.from_experts_modules(modules, pin=False)
    routing = clustered_routing(requests, L, E, k, shape["prompt_len"] + shape["decode"])
    routers = [TopKRouter(H, E, k, seed=10 + i) for i in range(L)]
    # single requests first (they fill the EAMC past its capacity, so replacements happen), then batches
    order = list(range(requests))
    groups = [[r] for r in order[:requests // 2]]
    rest = order[requests // 2:]
    groups += [rest[i:i + batch] for i in range(0, len(rest), batch)]
    # the reference has the paper's activation score: its depth factor, no frequency prior (the defaults since)
    cfg = OffloadConfig(cache_budget=budget, eviction=eviction, prefetch=prefetch, eamc_capacity=capacity,
                        eamc_top_matches=top_matches, eviction_depth_factor=eviction == "activation",
                        **({"eviction_frequency_weight": 0.0} if eviction == "activation" else {}))
    args = (modules, store, routers, cfg, routing, groups, shape["prompt_len"], H, in_flight)
    want = drive(reference, *args)
    got = drive(current, *args)
    compare(want, got)
    return want


@pytest.mark.parametrize("in_flight", ["none", "partial"])
@pytest.mark.parametrize("eviction,prefetch", POLICIES)
def test_same_decisions_every_policy(eviction, prefetch, in_flight):
    want = run_case(SMALL, eviction, prefetch, "25%", batch=3, in_flight=in_flight)
    assert want["stats"]["uses"] > 0
    if prefetch != "none":
        assert want["stats"]["prefetches"] > 0  # the prefetch paths ran


@pytest.mark.parametrize("budget", ["7%", "40%", "90%"])
@pytest.mark.parametrize("batch", [1, 4])
def test_same_decisions_activation_budgets(budget, batch):
    # 7%: 6 slots for 16-expert layers, so a batch's union needs several rounds; 90%: mostly free slots
    want = run_case(SMALL, "activation", "activation", budget, batch=batch, in_flight="partial")
    assert want["stats"]["prefetches"] > 0


@pytest.mark.parametrize("top_matches", [1, 4])
def test_same_decisions_deepseek_shape(top_matches):
    # DeepSeek-V2-Lite's layer x expert x top-k: many equal scores (unpredicted layers, equal counts) to break
    shape = dict(layers=26, experts=64, top_k=6, hidden=16, prompt_len=4, decode=8)
    want = run_case(shape, "activation", "activation", "6%", batch=4, in_flight="partial", capacity=6,
                    top_matches=top_matches, requests=10)
    assert want["stats"]["prefetches"] > 0 and want["stats"]["prefetches_wasted"] > 0


class OracleRouter(torch.nn.Module):
    """Router lookahead that sees true routing: returns the next forward's picks for its layer (set by the driver)."""

    def __init__(self, feed: dict, layer: int):
        super().__init__()
        self.feed, self.layer = feed, layer

    def forward(self, hidden_states):
        return None, None, self.feed[self.layer]


def drive_with_oracle(module, modules, store, cfg, routing, groups, prompt_len, hidden, check=None) -> dict:
    """:func:`drive` with a lookahead that sees the true routing of the next layer; returns the statistics."""
    feed: dict = {}
    routers = [OracleRouter(feed, i) for i in range(routing.shape[1])]
    return drive(module, modules, store, routers, cfg, routing, groups, prompt_len, hidden, "none", feed=feed,
                 check=check)["stats"]


@pytest.mark.parametrize("batch", [1, 3])
def test_lookahead_refines_what_activation_eviction_reads(batch):
    """Activation-aware eviction beside the lookahead prefetch reads the EAMC prediction with the next layer's row
    replaced by the lookahead's picks: the refined row is exactly the picks' distribution, every other row the
    predictor's. Against the reference (which gave eviction the plain prediction, so activation-aware admission
    refused lookahead picks the EAMC ranked low), the same routing gets more of its uses from prefetches."""
    shape = SMALL
    L, E, k, H = shape["layers"], shape["experts"], shape["top_k"], shape["hidden"]
    modules = experts_modules(L, E, H)
    store = HostExpertStore.from_experts_modules(modules, pin=False)
    routing = clustered_routing(14, L, E, k, shape["prompt_len"] + shape["decode"])
    groups = [[r] for r in range(7)] + [list(range(7, 14))[i:i + batch] for i in range(0, 7, batch)]
    cfg = OffloadConfig(cache_budget="25%", eviction="activation", prefetch="lookahead", eamc_capacity=5,
                        eamc_top_matches=2, eviction_depth_factor=True,
                        eviction_frequency_weight=0.0)  # as the reference scores
    checked = []

    def check(off, layer, picks):
        if picks is None:  # the last layer: nothing ahead to refine
            return
        got, base = off.refined.prediction, off.predictor.prediction
        counts = np.bincount(picks.reshape(-1).numpy(), minlength=E)
        assert np.allclose(got[layer + 1], counts / counts.sum())
        assert np.array_equal(np.delete(got, layer + 1, axis=0), np.delete(base, layer + 1, axis=0))
        checked.append(layer)

    args = (modules, store, cfg, routing, groups, shape["prompt_len"], H)
    refined = drive_with_oracle(current, *args, check=check)
    plain = drive_with_oracle(reference, *args)
    assert len(checked) > L  # several forwards checked
    assert refined["uses"] == plain["uses"]
    assert refined["prefetch_recall"] > plain["prefetch_recall"]
    assert refined["hit_rate"] > plain["hit_rate"]


def test_auto_eviction_is_lru_for_a_lone_decode_step_and_activation_otherwise():
    """``expert_eviction: auto`` (the default): the decode step of a lone sequence ranks victims by recency alone
    (LRU) and runs no EAMC matching; every other forward -- batched decode steps and every prefill, one
    sequence's included (the serving engine prefills each new request alone, beside a running batch) -- decides
    exactly as activation-aware eviction does; uses are counted in both modes, so the frequency prior is current
    when a batch forms."""
    from tritonmoe.backend.offload.eviction import BatchAwareEviction

    shape = SMALL
    L, E, k, H = shape["layers"], shape["experts"], shape["top_k"], shape["hidden"]
    P = shape["prompt_len"]
    modules = experts_modules(L, E, H)
    store = HostExpertStore.from_experts_modules(modules, pin=False)
    routing = clustered_routing(12, L, E, k, P + shape["decode"])
    routers = [TopKRouter(H, E, k, seed=10 + i) for i in range(L)]

    def cfg(eviction):  # uses never forgotten (half-life 0), so that they can be counted below
        return OffloadConfig(cache_budget="25%", eviction=eviction, prefetch="lookahead", eamc_capacity=5,
                             eamc_top_matches=2,
                             **({"eviction_frequency_half_life": 0.0} if eviction in ("auto", "activation") else {}))

    def run(eviction, groups):
        return drive(current, modules, store, routers, cfg(eviction), routing, groups, P, H, "none")

    # batches: every forward is activation-aware
    batches = [[6, 7, 8], [9, 10, 11]]
    auto_batch, activation = run("auto", batches), run("activation", batches)
    assert auto_batch["calls"] == activation["calls"] and np.array_equal(auto_batch["slot_of"], activation["slot_of"])
    assert auto_batch["calls"] != run("lru", batches)["calls"]  # the batch mode is not LRU here
    # one request: its prefill decides as activation-aware eviction does (the same copies up to its end) ...
    one = [[0]]
    auto_one, act_one, lru_one = run("auto", one), run("activation", one), run("lru", one)
    prefill = drive(current, modules, store, routers, cfg("activation"), routing[:, :, :P], one, P, H, "none")["calls"]
    assert prefill and auto_one["calls"][:len(prefill)] == prefill == act_one["calls"][:len(prefill)]
    assert lru_one["calls"][:len(prefill)] != prefill
    # ... and its decode steps as LRU: the whole run is neither policy's alone
    assert auto_one["calls"] != lru_one["calls"] and auto_one["calls"] != act_one["calls"]

    # which policy ranked the victims of each forward, and where the EAMC matching ran
    off = current.Offloader(cfg("auto"), store, torch.device("cpu"), routers)
    eviction = off.cache.eviction
    assert isinstance(eviction, BatchAwareEviction)
    ranked = []
    for name, policy in (("lru", eviction._lru), ("activation", eviction.activation)):
        for method in ("values", "cell_values"):
            real = getattr(policy, method)
            setattr(policy, method, lambda *a, _real=real, _name=name: ranked.append(_name) or _real(*a))
    observed = []
    real_observe = off.predictor.observe
    off.predictor.observe = lambda layer: observed.append(layer) or real_observe(layer)
    gen = torch.Generator().manual_seed(3)

    def forward(seqs, phase, rows):
        off.begin_forward(seqs, phase)
        n = len(seqs) * rows
        x, w = torch.randn(n, H, generator=gen), torch.full((n, k), 1.0 / k)
        span = slice(0, P) if phase == "prefill" else slice(P, P + 1)
        for layer in range(L):
            off.run_experts(layer, modules[layer], x, torch.as_tensor(routing[:len(seqs), layer, span].reshape(n, k)),
                            w)
        got, seen = set(ranked), list(observed)
        ranked.clear(), observed.clear()
        return got, seen, eviction.single

    got, seen, single = forward(["a"], "prefill", P)  # a lone request's prefill: a full cache's worth of misses
    assert not single and got == {"activation"} and seen == list(range(L)), (got, seen)
    uses = eviction.activation._uses.sum()
    got, seen, single = forward(["a"], "decode", 1)
    assert single and got <= {"lru"} and seen == [], (got, seen)
    assert eviction.activation._uses.sum() == uses + L * k  # counted, not matched
    assert eviction.always_admits
    got, seen, single = forward(["a", "b"], "decode", 1)
    assert not single and not eviction.always_admits and seen == list(range(L)), (got, seen)
    assert got <= {"activation"}
