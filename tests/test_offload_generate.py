"""End to end on CPU: greedy generation with offloaded experts equals the stock model's, for every architecture,
cache budget, eviction and prefetch policy; and the engine interface (begin_forward / end_sequence / stats) does
what it says."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tritonmoe.backend.offload import EXPERTS_IMPLEMENTATION, OffloadConfig, load_offloaded_model
from tritonmoe.tools.tiny_models import ARCHITECTURES, TinySpec, build

hf_logging.disable_progress_bar()

EXPERTS, TOP_K, LAYERS, NEW_TOKENS = 8, 2, 3, 5
BUDGETS = {"one_per_layer": f"{100 / EXPERTS}%", "middle": "40%", "all_resident": "100%"}
PROMPTS = [[5, 17, 33, 9, 100, 41, 7, 250], [301, 12, 8], [77, 78, 79, 80, 81]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload_tiny")
    return {arch: build(TinySpec(arch=arch, layers=LAYERS, experts=EXPERTS, top_k=TOP_K), root / arch)
            for arch in ARCHITECTURES}


def left_padded(prompts: list[list[int]], pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def greedy(model, ids, mask, offloader=None, seq_ids=None, finish=True):
    """``model.generate``; with an offloader, each forward is announced as the serving engine would, and the
    sequences end (``finish``) once generation does."""
    hook = None
    if offloader is not None:
        def announce(module, args, kwargs):
            rows = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
            offloader.begin_forward(seq_ids, "prefill" if rows.shape[1] > 1 else "decode")
        hook = model.register_forward_pre_hook(announce, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False)
    finally:
        if hook is not None:
            hook.remove()
        for s in (seq_ids or []) if finish else []:
            offloader.end_sequence(s)


@pytest.fixture(scope="module")
def expected(checkpoints):
    """The stock model's tokens: each prompt alone, then all of them as one left-padded batch."""
    out = {}
    for arch, path in checkpoints.items():
        ref = AutoModelForCausalLM.from_pretrained(path).eval()
        singles = [greedy(ref, *left_padded([p])) for p in PROMPTS[:2]]
        out[arch] = (singles, greedy(ref, *left_padded(PROMPTS)))
    return out


EVICTIONS, PREFETCHES = ("lru", "lfu", "activation"), ("none", "activation", "lookahead")


def _cases():
    """Every budget x eviction x prefetch on Mixtral; on each other architecture, three of them that still cover
    every budget, every eviction policy and every prefetch policy (a Latin square, shifted per architecture)."""
    for arch_index, arch in enumerate(ARCHITECTURES):
        if arch == "mixtral":
            yield from ((arch, *c) for c in itertools.product(BUDGETS, EVICTIONS, PREFETCHES))
            continue
        for b, budget in enumerate(BUDGETS):
            yield arch, budget, EVICTIONS[(b + arch_index) % 3], PREFETCHES[(b + 2 * arch_index) % 3]


@pytest.mark.parametrize("arch,budget,eviction,prefetch", list(_cases()))
def test_generation_matches_stock(checkpoints, expected, arch, budget, eviction, prefetch):
    cfg = OffloadConfig(cache_budget=BUDGETS[budget], eviction=eviction, prefetch=prefetch)
    model, offloader = load_offloaded_model(checkpoints[arch], "cpu", torch.float32, cfg)
    singles, batch = expected[arch]
    # one request at a time (later requests find earlier ones in the EAMC), then a batch of all of them
    for i, (prompt, want) in enumerate(zip(PROMPTS[:2], singles)):
        got = greedy(model, *left_padded([prompt]), offloader, [f"r{i}"])
        assert torch.equal(got, want), f"request {i}"
    got = greedy(model, *left_padded(PROMPTS), offloader, ["b0", "b1", "b2"])
    assert torch.equal(got, batch)

    s = offloader.stats()
    assert s["hits"] + s["misses"] == s["uses"] > 0
    assert s["num_slots"] == {"one_per_layer": offloader.store.num_layers, "middle": int(
        0.4 * offloader.store.num_layers * EXPERTS), "all_resident": offloader.store.num_layers * EXPERTS}[budget]
    assert s["eamc_entries"] == 2 + len(PROMPTS)
    if prefetch == "none":
        assert s["prefetches"] == 0
    if budget == "all_resident":
        # nothing is ever evicted, so each expert is fetched at most once, on demand or ahead of need
        assert s["misses"] + s["prefetches"] <= offloader.store.num_layers * EXPERTS
        assert s["prefetches_wasted"] == 0


def test_expert_weights_leave_the_model(checkpoints):
    model, offloader = load_offloaded_model(checkpoints["qwen2_moe"], "cpu", torch.float32,
                                            OffloadConfig(cache_budget="25%"))
    ref = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2_moe"])
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    assert len(experts) == LAYERS
    assert all(p.numel() == 0 for m in experts for p in m.parameters(recurse=False))
    # the shared expert stays a resident part of the model, untouched
    shared = dict(model.named_parameters())["model.layers.0.mlp.shared_expert.gate_proj.weight"]
    assert torch.equal(shared, dict(ref.named_parameters())["model.layers.0.mlp.shared_expert.gate_proj.weight"])
    # the host tier holds the exact bytes of every expert
    store = offloader.store
    ref_experts = [m for name, m in ref.named_modules() if name.endswith("mlp.experts")]
    for layer, expert in [(0, 0), (1, 5), (LAYERS - 1, EXPERTS - 1)]:
        views = store.layout.views(store.buffer(layer, expert))
        assert torch.equal(views["gate_up_proj"], ref_experts[layer].gate_up_proj[expert])
        assert torch.equal(views["down_proj"], ref_experts[layer].down_proj[expert])
    assert offloader.cache.pool.numel() == offloader.num_slots * store.layout.slot_bytes


def test_deepseek_dense_first_layer_is_not_offloaded(checkpoints):
    _, offloader = load_offloaded_model(checkpoints["deepseek_v3"], "cpu", torch.float32, OffloadConfig())
    assert offloader.store.num_layers == LAYERS - 1  # first_k_dense_replace=1


def test_traces_are_per_request_and_phase(checkpoints):
    model, offloader = load_offloaded_model(checkpoints["mixtral"], "cpu", torch.float32,
                                            OffloadConfig(cache_budget="100%", prefetch="none", eviction="lru"))
    ids, mask = left_padded(PROMPTS[:2])
    greedy(model, ids, mask, offloader, ["x", "y"], finish=False)
    width = ids.shape[1]
    for seq in ("x", "y"):
        prefill, decode = offloader.tracer.eam(seq)
        assert (prefill.sum(axis=1) == width * TOP_K).all()  # every prompt row (padding included), every layer
        assert (decode.sum(axis=1) == (NEW_TOKENS - 1) * TOP_K).all()  # the last token is never fed back
    assert not (offloader.tracer.eam("x") == offloader.tracer.eam("y")).all()
    assert len(offloader.eamc) == 0
    offloader.end_sequence("x")
    offloader.end_sequence("y")
    offloader.end_sequence("never-ran")  # a cancelled request that never ran: nothing to add
    assert len(offloader.eamc) == 2


def test_activation_prefetch_uses_the_collection(checkpoints):
    """With the EAMC holding this very request, the prediction is right: prefetches get used."""
    cfg = OffloadConfig(cache_budget="50%", eviction="activation", prefetch="activation")
    model, offloader = load_offloaded_model(checkpoints["olmoe"], "cpu", torch.float32, cfg)
    ids, mask = left_padded([PROMPTS[0]])
    greedy(model, ids, mask, offloader, ["first"])
    assert offloader.stats()["prefetches"] == 0  # the collection was empty: nothing to predict from
    for i in range(3):
        greedy(model, ids, mask, offloader, [f"again{i}"])
    s = offloader.stats()
    assert s["prefetches"] > 0 and s["prefetches_used"] > 0
    assert s["prefetch_precision"] > 0.5


def test_rows_must_split_over_sequences(checkpoints):
    model, offloader = load_offloaded_model(checkpoints["mixtral"], "cpu", torch.float32, OffloadConfig())
    offloader.begin_forward(["a", "b"], "prefill")
    with pytest.raises(ValueError, match="split evenly"):
        model(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="phase"):
        offloader.begin_forward(["a"], "training")


def test_forward_without_attach_is_a_clear_error(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"], experts_implementation=EXPERTS_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="attach_offloading"):
        model(torch.tensor([[5, 6, 7]]))


def test_eamc_persists_across_restarts(checkpoints, tmp_path):
    path = tmp_path / "eamc.npy"
    cfg = OffloadConfig(eamc_path=str(path), eamc_capacity=4)
    model, offloader = load_offloaded_model(checkpoints["qwen3_moe"], "cpu", torch.float32, cfg)
    greedy(model, *left_padded([PROMPTS[1]]), offloader, ["one"])
    offloader.close()
    _, again = load_offloaded_model(checkpoints["qwen3_moe"], "cpu", torch.float32, cfg)
    assert len(again.eamc) == 1
    assert (again.eamc.eams == offloader.eamc.eams).all()


def test_cpu_path_never_loads_cuda_code(checkpoints):
    import subprocess
    import sys

    code = ("import sys, torch; from tritonmoe.backend.offload import OffloadConfig, load_offloaded_model; "
            f"m, o = load_offloaded_model({str(checkpoints['olmoe'])!r}, 'cpu', torch.float32, OffloadConfig()); "
            "m(torch.tensor([[5, 6, 7]])); "
            "print(any(n.endswith('cuda_copy_engine') for n in sys.modules), torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_slot_banks_wider_than_grouped_mm_allows_split_into_blocks(checkpoints, expected, monkeypatch):
    """CUDA's grouped_mm takes at most 1023 groups, so a cache of more slots computes a layer in blocks of slots
    (seen on the H100 with Qwen3-30B-A3B at 25%: 1536 slots). With the limit lowered to 2 slots, nearly every
    layer splits into blocks, and the tokens must not change."""
    from tritonmoe.backend.offload import offloader as offloader_module

    monkeypatch.setattr(offloader_module, "MAX_GROUPS", 2)
    monkeypatch.setattr(offloader_module, "GATHER_MAX_BYTES", 0)  # no compact banks: the blocks are under test
    monkeypatch.setattr(offloader_module, "GATHER_POOL_SHARE", 0)
    model, offloader = load_offloaded_model(checkpoints["mixtral"], "cpu", torch.float32,
                                            OffloadConfig(cache_budget="100%", eviction="lru", prefetch="none"))
    blocks = []
    real = offloader_module.weighted_pair_outputs

    def spy(*args, used_slots, first_slot=0, **kwargs):
        blocks.append(used_slots)
        return real(*args, used_slots=used_slots, first_slot=first_slot, **kwargs)

    monkeypatch.setattr(offloader_module, "weighted_pair_outputs", spy)
    singles, batch = expected["mixtral"]
    assert torch.equal(greedy(model, *left_padded([PROMPTS[0]]), offloader, ["r0"]), singles[0])
    assert torch.equal(greedy(model, *left_padded(PROMPTS), offloader, ["b0", "b1", "b2"]), batch)
    assert max(blocks) <= 2 and len(blocks) > 2 * LAYERS * (NEW_TOKENS + 1)  # more calls than layer forwards


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_compact_banks_gathered_from_scattered_slots(checkpoints, expected, monkeypatch, arch):
    """A round whose slots lie far apart computes on a compact copy of just those slots (one gather), whatever
    the limit on groups; with the thresholds lowered, rounds take that path, and the tokens must not change."""
    from tritonmoe.backend.offload import offloader as offloader_module

    monkeypatch.setattr(offloader_module, "MAX_GROUPS", 2)  # and never more than 2 groups in a bank of slots
    monkeypatch.setattr(offloader_module, "GATHER_MIN_BANK", 0)
    monkeypatch.setattr(offloader_module, "GATHER_FACTOR", 1)  # gather whenever the slots are not contiguous
    model, offloader = load_offloaded_model(checkpoints[arch], "cpu", torch.float32,
                                            OffloadConfig(cache_budget="40%", eviction="lfu", prefetch="none"))
    calls = []
    real = offloader_module.weighted_pair_outputs

    def spy(module, slot_views, *args, used_slots, first_slot=0, **kwargs):
        compact = slot_views is not offloader.cache.views
        calls.append(compact)
        if compact:  # a bank of exactly the experts used, each once
            assert first_slot == 0 and next(iter(slot_views.values())).shape[0] == used_slots
        return real(module, slot_views, *args, used_slots=used_slots, first_slot=first_slot, **kwargs)

    monkeypatch.setattr(offloader_module, "weighted_pair_outputs", spy)
    singles, batch = expected[arch]
    assert torch.equal(greedy(model, *left_padded([PROMPTS[0]]), offloader, ["r0"]), singles[0])
    assert torch.equal(greedy(model, *left_padded(PROMPTS), offloader, ["b0", "b1", "b2"]), batch)
    assert sum(calls) >= 3  # the compact path ran (contiguous slots keep the plain bank)


def test_lookahead_without_a_findable_router_is_a_clear_error(checkpoints):
    """The default prefetch applies the next block's router; a model whose blocks keep it elsewhere is refused at
    attach time with what to set instead, and attaches with a prefetch that needs no router."""
    from tritonmoe.backend.offload import attach_offloading

    def model_with_hidden_routers():
        model = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"],
                                                     experts_implementation=EXPERTS_IMPLEMENTATION)
        for layer in model.model.layers:
            block = layer.mlp
            block.renamed_router = block.gate
            del block.gate
        return model

    with pytest.raises(ValueError, match="expert_prefetch to 'activation' or 'none'"):
        attach_offloading(model_with_hidden_routers(), OffloadConfig(), device="cpu")
    offloader = attach_offloading(model_with_hidden_routers(), OffloadConfig(prefetch="none"), device="cpu")
    assert offloader.num_slots > 0


def test_one_read_back_brings_the_routing_and_the_lookahead_picks():
    """The offloader reads a layer's routing and what the prefetch policy queued for its plan (the lookahead's
    per-expert pick counts) back in one transfer; both arrive intact, and a plan made from them equals one made
    by the policy reading its picks back itself."""
    import numpy as np

    from tritonmoe.backend.offload.offloader import _read_back
    from tritonmoe.backend.offload.prefetch import RouterLookaheadPrefetch

    class Router(torch.nn.Module):
        def forward(self, h):
            return None, None, (h[:, :2].abs() * 1000).long() % 8

    routing = torch.tensor([[3, 1], [0, 7], [3, 5]])
    policy = RouterLookaheadPrefetch([Router(), Router()], num_experts=8)
    h = torch.randn(3, 4)
    launched = policy.launch(0, h)
    got_routing, picks = _read_back(routing, launched)
    assert np.array_equal(got_routing, routing.numpy()) and np.array_equal(picks, launched.numpy())
    merged, alone = policy.plan(0, h, picks), policy.plan(0, h)
    assert all(np.array_equal(a, b) for a, b in zip(merged, alone)) and len(merged[1]) > 0
    assert policy.launch(1, h) is None and _read_back(routing, None)[1] is None  # the last layer: nothing ahead


def test_bank_plan_gathers_only_where_it_pays():
    """The compact gather moves its experts' bytes twice: on a CPU (empty groups cost) it replaces any sparse bank;
    on CUDA only a bank too wide for one grouped_mm call (else blocks); never beyond the byte limit."""
    from tritonmoe.backend.offload.offloader import MAX_GROUPS, bank_plan

    mib = 2**20
    assert bank_plan(8, 8, 8 * mib, 256 * mib, empty_groups_cost=True) == "bank"  # contiguous
    assert bank_plan(500, 8, 8 * mib, 256 * mib, empty_groups_cost=True) == "gather"
    assert bank_plan(500, 8, 8 * mib, 256 * mib, empty_groups_cost=False) == "bank"
    assert bank_plan(MAX_GROUPS + 1, 40, 400 * mib, 1024 * mib, empty_groups_cost=False) == "gather"
    assert bank_plan(MAX_GROUPS + 1, 40, 400 * mib, 256 * mib, empty_groups_cost=False) == "blocks"
    assert bank_plan(500, 40, 400 * mib, 256 * mib, empty_groups_cost=True) == "bank"  # too big to gather
    assert bank_plan(MAX_GROUPS + 1, 600, 600 * mib, 2048 * mib, empty_groups_cost=True) == "blocks"  # not sparse
