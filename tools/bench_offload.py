"""Expert-offloading benchmark: learned routing replayed on full-size expert shapes, every policy side by side.

What runs: a real transformers model of the target architecture (DeepSeek-V2-Lite: 27 layers, the first dense,
26 MoE layers x 64 routed experts top-6 + 2 shared, hidden 2048, expert ffn 1408, MLA attention; Qwen3-30B-A3B:
48 MoE layers x 128 experts top-8, hidden 2048, expert ffn 768, GQA attention) in bf16 with random weights:
real attention with a KV cache, real shared experts / dense MLP, real LM head, real expert matmuls through the
same ``Offloader`` the serving engine uses (or transformers' ``grouped_mm`` with every expert on the device for
the all-resident baseline). Only the routing is not the model's own: each MoE layer's router is replaced by a
replay of a trace recorded from a small MoE of the same layer x expert x top-k shape trained on real text
(``tools/train_routing.py``): trained layer ``i`` / expert ``e`` = full-size layer ``i`` / expert ``e``.

Policies (one engine, ``backend/offload``): ``activation`` (MoE-Infinity: activation-aware eviction and EAMC
prefetch, the EAMC filled from the trace file's held-out ``eamc`` requests, never from the replayed ``eval``
ones), ``lru`` (on-demand, no prefetch), ``lfu`` (on-demand), ``lookahead`` (LRU eviction, next layer's router
applied to this layer's expert input -- replayed from the small model, where it was computed for real),
``activation_freq+lookahead`` (the serving default: activation-aware eviction on the lookahead-refined prediction
without the paper's ``(1 - i/L)`` depth factor, plus each layer's expert-use frequencies as a prior; lookahead
prefetch), ``activation_flat+lookahead`` (the same without the prior), ``activation+lookahead`` (the paper's score,
depth factor included, on the refined prediction), ``lfu+lookahead``. ``activation`` is the paper's policy as it
has it (depth factor, no prior).
Baselines: ``resident`` (all experts on the GPU, stock ``grouped_mm``), ``accelerate`` (HF Accelerate
``dispatch_model`` CPU offload of whole experts modules at the same budget, on a reduced layer count, scaled).

    python -m tritonmoe.tools.bench_offload --shape qwen3 --traces runs/routing/qwen3.npz --out bench.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from tritonmoe.backend.offload import OffloadConfig, attach_offloading
from tritonmoe.backend.offload import offloader as offloader_module
from tritonmoe.backend.offload.config import ACTIVATION_EVICTION, DEFAULT_FREQUENCY_WEIGHT
from tritonmoe.backend.offload.eam import EAMCollection
from tritonmoe.backend.offload.experts_forward import HANDLE_ATTR
from tritonmoe.backend.offload.host_store import HostExpertStore
from tritonmoe.backend.offload.layout import ExpertLayout
from tritonmoe.backend.offload.stats import FIELDS, rates
from tritonmoe.tools.offload_oracle import forward_experts, min_moved_per_step, schedule
from tritonmoe.tools.train_routing import Traces

POLICIES = {  # name -> (eviction, prefetch); the paper's rows keep its depth factor (DEPTH_FACTOR)
    "activation": ("activation", "activation"),
    "lru": ("lru", "none"),
    "lfu": ("lfu", "none"),
    "lookahead": ("lru", "lookahead"),
    # the same engine with a baseline's eviction and the lookahead prefetch: which half of a policy decides
    "lfu+lookahead": ("lfu", "lookahead"),
    # activation-aware eviction on the lookahead-refined prediction: the paper's score (with its (1 - i/L) depth
    # factor; the default until 2026-12-01), without the factor, and without it plus the frequency prior (the
    # serving default: expert_eviction_depth_factor false, expert_eviction_frequency_weight 2)
    "activation+lookahead": ("activation", "lookahead"),
    "activation_flat+lookahead": ("activation", "lookahead"),
    "activation_freq+lookahead": ("activation", "lookahead"),
    # the serving default since 2026-12-01 (session 9): activation_freq+lookahead for batches, lookahead (+LRU) alone
    "auto+lookahead": ("auto", "lookahead"),
}
DEPTH_FACTOR = {"activation", "activation+lookahead"}
NO_FREQUENCY_PRIOR = {"activation", "activation+lookahead", "activation_flat+lookahead"}


def make_config(shape: str, layers: int | None = None, small: bool = False):
    """The target architecture's transformers config; ``layers`` MoE layers (default: all); ``small``: tiny
    hidden sizes for CPU development of this harness (same code path)."""
    import transformers as tf

    if shape == "dsv2lite":
        kw = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                  num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                  n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
                  q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  norm_topk_prob=False, max_position_embeddings=4096)
        if small:
            kw.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16)
        if layers is not None:
            kw["num_hidden_layers"] = layers + 1
        cfg = tf.DeepseekV2Config(**kw)
    elif shape == "qwen3":
        kw = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                  num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[], max_position_embeddings=4096, use_sliding_window=False)
        if small:
            kw.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        if layers is not None:
            kw["num_hidden_layers"] = layers
        cfg = tf.Qwen3MoeConfig(**kw)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cfg.tie_word_embeddings = False
    return cfg


def _experts_modules(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "has_gate") and hasattr(m, "is_transposed") and hasattr(m, "num_experts")]


# ------------------------------------------------------------------------------------------------ routing replay
class Feed:
    """The routing of the forward about to run, per MoE layer: set by the driver, read by the replay routers."""

    def __init__(self):
        self.indices: list[torch.Tensor] = []  # per MoE layer [rows, k] int64 on the device
        self.weights: torch.Tensor | None = None  # [rows, k]
        # per MoE layer l: picks of layer l+1's router, flattened, on the device as a real router's would be (so
        # the offloader reads them back with the routing, as in serving)
        self.lookahead: list[torch.Tensor] = []

    def set_lookahead_prefill(self, counts: np.ndarray, device) -> None:
        """``counts[l, e]``: how often layer l+1's router picked expert e over the prompts."""
        self.lookahead = [torch.as_tensor(np.repeat(np.arange(counts.shape[1]), c), device=device) for c in counts]

    def set_lookahead_step(self, picks: np.ndarray, device) -> None:
        """``picks[b, l]``: the experts layer l+1's router picked for sequence b at this decode step."""
        picks = torch.as_tensor(picks.astype(np.int64), device=device)  # one copy; views per layer
        self.lookahead = [picks[:, l].reshape(-1) for l in range(picks.shape[1])]


class ReplayRouter(torch.nn.Module):
    """Stands in for MoE layer ``layer``'s router: returns the recorded top-k (uniform weights: the weights change
    nothing that is timed)."""

    def __init__(self, feed: Feed, layer: int):
        super().__init__()
        self.feed, self.layer = feed, layer

    def forward(self, hidden_states):
        return None, self.feed.weights, self.feed.indices[self.layer]


class LookaheadReplay:
    """What MoE layer ``layer``'s router would pick from the previous layer's expert input, as recorded in the
    small model (``RouterLookaheadPrefetch`` calls ``routers[l + 1].forward(h)`` at layer ``l``)."""

    def __init__(self, feed: Feed, layer: int):
        self.feed, self.layer = feed, layer

    def forward(self, hidden_states):
        return None, None, self.feed.lookahead[self.layer - 1]


@dataclass
class Bench:
    shape: str
    traces: Traces
    device: torch.device
    dtype: torch.dtype
    small: bool = False
    host_layers: int = 8

    def build(self, layers: int | None = None):
        """The model with random non-expert weights on the device, expert parameters left on the meta device,
        routers replaced by replays. Returns ``(model, feed, experts_modules)``."""
        import transformers as tf

        cfg = make_config(self.shape, layers if layers is not None or not self.small else self.traces.layers,
                          self.small)
        if self.small:  # CPU development and tests: any trace file's layer x expert x top-k shape
            experts_key = "n_routed_experts" if self.shape == "dsv2lite" else "num_experts"
            setattr(cfg, experts_key, self.traces.num_experts)
            cfg.num_experts_per_tok = self.traces.top_k
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        experts = _experts_modules(model)
        # the experts' own shapes: the placeholders attach_offloading leaves behind have none
        self.expert_shapes = [{n: (tuple(p.shape), p.dtype) for n, p in m.named_parameters(recurse=False)}
                              for _, m in experts]
        expert_params = {id(p) for _, m in experts for p in m.parameters(recurse=False)}
        gen = torch.Generator(device=self.device).manual_seed(0)
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or id(p) in expert_params:
                    continue
                t = torch.empty(p.shape, dtype=self.dtype, device=self.device)
                if p.dim() == 1:
                    t.fill_(1.0)  # norms
                else:
                    t.normal_(0.0, 0.02, generator=gen)
                module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        rot = model.model.rotary_emb
        model.model.rotary_emb = type(rot)(config=model.config).to(self.device)  # its buffers were on meta
        feed = Feed()
        for i, (name, _) in enumerate(experts):
            block = model.get_submodule(name.rpartition(".")[0])
            block.gate = ReplayRouter(feed, i)
        model.eval()
        return model, feed, [m for _, m in experts]

    def random_bytes(self, nbytes: int, seed: int) -> torch.Tensor:
        """``nbytes`` of random bf16 values (std 0.02) on the device, as uint8."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        return (torch.randn(nbytes // 2, generator=g, device=self.device, dtype=torch.float32) * 0.02).to(
            torch.bfloat16).view(torch.uint8)

    def host_store(self, modules) -> HostExpertStore:
        """Pinned host tier. ``host_layers`` distinct layers' bytes, reused cyclically by the MoE layers (layer
        ``l`` reads buffer ``l % host_layers``): every copy still moves its full expert from pinned host memory,
        and each buffer (>= 1 GB) is far larger than any CPU cache, so this only saves host memory."""
        layout = ExpertLayout.of_experts_module(modules[0])
        E = modules[0].num_experts
        pin = self.device.type == "cuda"
        n = len(modules) if self.host_layers <= 0 else min(self.host_layers, len(modules))
        bufs = []
        for i in range(n):
            buf = torch.empty((E, layout.slot_bytes), dtype=torch.uint8, pin_memory=pin)
            buf.view(-1).copy_(self.random_bytes(buf.numel(), seed=100 + i))
            bufs.append(buf)
        return HostExpertStore(layout, [bufs[i % n] for i in range(len(modules))])

    def make_resident(self, modules) -> None:
        """Every expert on the device (distinct random weights per layer), stock ``grouped_mm``."""
        for i, m in enumerate(modules):
            for name, (shape, dtype) in self.expert_shapes[i].items():
                nbytes = int(np.prod(shape)) * dtype.itemsize
                t = self.random_bytes(nbytes, seed=200 + i).view(dtype).view(shape)
                m._parameters[name] = torch.nn.Parameter(t, requires_grad=False)

    def drop_resident(self, modules) -> None:
        """Expert parameters back to shaped meta tensors: frees resident weights, and lets ``attach_offloading``
        read the layout again after an earlier offloader left 0-size placeholders."""
        for i, m in enumerate(modules):
            for name, (shape, dtype) in self.expert_shapes[i].items():
                m._parameters[name] = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                                         requires_grad=False)


def eamc_file(traces: Traces, gen_len: int, capacity: int, path: str) -> int:
    """An EAMC filled with the trace file's ``eamc`` requests (prompt + ``gen_len`` decode tokens), saved."""
    coll = EAMCollection(capacity, traces.layers, traces.num_experts)
    for r in traces.indices("eamc"):
        coll.add(traces.eam(r, gen_len))
    coll.save(path)
    return len(coll)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_PER_LAYER = ("uses", "hits", "stall_s")  # also kept per MoE layer: where the misses and the stalls are
_KEYS = FIELDS + tuple(f"{k}_per_layer" for k in _PER_LAYER)


def _snap(offloader) -> dict:
    if offloader is None:
        return {k: 0 for k in _KEYS}
    s = offloader.stats()
    return {**{k: s[k] for k in FIELDS}, **{f"{k}_per_layer": np.array(s["per_layer"][k]) for k in _PER_LAYER}}


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in _KEYS}


def _per_layer(d: dict, steps: int) -> dict:
    """Decode hit rate and stall per step of each MoE layer (empty lists without an offloader)."""
    uses, hits = np.asarray(d["uses_per_layer"]), np.asarray(d["hits_per_layer"])
    if not uses.ndim:
        return {"decode_hit_rate_per_layer": [], "decode_stall_ms_per_layer": []}
    rate = np.divide(hits, uses, out=np.zeros(len(uses)), where=uses > 0)
    return {"decode_hit_rate_per_layer": np.round(rate, 4).tolist(),
            "decode_stall_ms_per_layer": np.round(1e3 * np.asarray(d["stall_s_per_layer"]) / steps, 4).tolist()}


def attach_policy(policy: str, budget: int, eamc_capacity: int, eamc_path: str, eamc_master: str, bench, model,
                  modules, store, feed: Feed, device, frequency_half_life: float | None = None):
    """Offload ``model``'s experts under benchmark policy ``policy`` at ``budget`` %, its EAMC a fresh copy of the
    run's collection (each run starts from the same one) and its lookahead, if any, the replayed one. Returns the
    offloader and whether it looks ahead."""
    eviction, prefetch = POLICIES[policy]
    shutil.copy(eamc_master, eamc_path)
    bench.drop_resident(modules)
    cfg = OffloadConfig(cache_budget=f"{budget}%", eviction=eviction, prefetch=prefetch,
                        eviction_depth_factor=policy in DEPTH_FACTOR,
                        eviction_frequency_weight=0.0 if policy in NO_FREQUENCY_PRIOR else DEFAULT_FREQUENCY_WEIGHT,
                        eamc_capacity=eamc_capacity, eamc_path=eamc_path,
                        **({} if frequency_half_life is None or eviction not in ACTIVATION_EVICTION else
                           {"eviction_frequency_half_life": frequency_half_life}))
    off = attach_offloading(model, cfg, device=device, host_store=store)
    lookahead = prefetch == "lookahead"
    if lookahead:
        off.set_lookahead_routers([LookaheadReplay(feed, i) for i in range(len(modules))])
    return off, lookahead


def run_requests(model, feed: Feed, traces: Traces, groups: list[list[int]], gen_len: int, device, offloader,
                 warmup: int, lookahead: bool, first_moe: int = 0, warmup_tokens: int | None = None) -> dict:
    """Prefill + ``gen_len`` decode steps for each group of request ids; the first ``warmup`` groups are not
    counted (they warm the kernels and the cache). Returns times and per-phase stats deltas."""
    from transformers import DynamicCache

    wall = time.perf_counter()

    L = len(_experts_modules(model))
    P = traces.prompt_len
    k = traces.top_k
    ttft, steps = [], []
    phase_stats = {"prefill": {key: 0 for key in _KEYS}, "decode": {key: 0 for key in _KEYS}}
    vocab = model.config.vocab_size
    for gi, group in enumerate(groups):
        B = len(group)
        counted = gi >= warmup
        routes = torch.as_tensor(traces.experts[group][:, first_moe:first_moe + L].astype(np.int64))  # [B,L,T,k]
        seq_ids = [f"g{gi}r{r}" for r in group]
        ids = torch.randint(0, vocab, (B, P), device=device, generator=torch.Generator(device=device).manual_seed(gi))
        cache = DynamicCache(config=model.config)
        # prefill: rows are (b, t) flattened, as the offloader's begin_forward expects
        feed.indices = [routes[:, l, :P].reshape(B * P, k).to(device) for l in range(L)]
        feed.weights = torch.full((B * P, k), 1.0 / k, dtype=model.dtype, device=device)
        if lookahead:
            feed.set_lookahead_prefill(
                traces.lookahead_prefill[group][:, first_moe:first_moe + L - 1].astype(np.int64).sum(axis=0), device)
        s0 = _snap(offloader)
        if offloader is not None:
            offloader.begin_forward(seq_ids, "prefill")
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        s1 = _snap(offloader)
        dec_routes = [routes[:, l, P:P + gen_len].to(device) for l in range(L)]  # [B, G, k] per layer
        feed.weights = torch.full((B, k), 1.0 / k, dtype=model.dtype, device=device)
        for t in range(gen_len if counted or warmup_tokens is None else min(gen_len, warmup_tokens)):
            feed.indices = [dec_routes[l][:, t] for l in range(L)]
            if lookahead:
                feed.set_lookahead_step(traces.lookahead[group][:, first_moe:first_moe + L - 1, t], device)
            if offloader is not None:
                offloader.begin_forward(seq_ids, "decode")
            ts = time.perf_counter()
            with torch.no_grad():
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            if counted:
                steps.append(time.perf_counter() - ts)
        s2 = _snap(offloader)
        if offloader is not None:
            for s in seq_ids:
                offloader.end_sequence(s)
        if counted:
            ttft.append(t1 - t0)
            for key, v in _delta(s0, s1).items():
                phase_stats["prefill"][key] += v
            for key, v in _delta(s1, s2).items():
                phase_stats["decode"][key] += v
        del cache, out
    return {"ttft_s": statistics.mean(ttft), "tpot_s": statistics.mean(steps),
            "tpot_median_s": statistics.median(steps), "decode_steps": len(steps), "groups": len(groups) - warmup,
            "phase_stats": phase_stats, "wall_s": time.perf_counter() - wall}


def forward_routing(traces: Traces, kind: str, rows) -> tuple[np.ndarray, np.ndarray]:
    """The replayed routing of one forward of ``offload_oracle.schedule``: its experts
    (``offload_oracle.forward_experts``) and what the lookahead picks -- over the prompts, counts ``[L - 1, E]``
    (``Feed.set_lookahead_prefill``); at the step, picks ``[B, L - 1, k]`` (``Feed.set_lookahead_step``)."""
    if kind == "prefill":
        return forward_experts(traces, kind, rows), traces.lookahead_prefill[rows].astype(np.int64).sum(axis=0)
    return forward_experts(traces, kind, rows), np.stack([traces.lookahead[r][:, t] for r, t in rows])


def run_continuous(model, feed: Feed, traces: Traces, groups: list[list[int]], gen_len: int, device, offloader,
                   warmup: int, lookahead: bool, gap: int, warmup_tokens: int | None = None) -> dict:
    """:func:`run_requests` under continuous batching, as ``backend.engine`` runs it: a group's requests join one
    by one (``offload_oracle.schedule``, every ``gap`` decode steps), each prefilled alone and merged into the
    running batch's KV cache (``backend.kv_batch.KVBatch``: left-padded rows, per-row positions and mask), and
    leave after their tokens. TTFT: each prefill forward; TPOT: each decode step, whatever its batch. Also returns
    every request's generated tokens (``tokens``: request id -> ids) and the logit each was picked with
    (``logits``), which must not depend on the schedule."""
    from transformers import DynamicCache

    from tritonmoe.backend.kv_batch import KVBatch

    wall = time.perf_counter()
    L, P, k = len(_experts_modules(model)), traces.prompt_len, traces.top_k
    ttft, steps, sizes, tokens, logits = [], [], [], {}, {}
    phase_stats = {"prefill": {key: 0 for key in _KEYS}, "decode": {key: 0 for key in _KEYS}}
    vocab = model.config.vocab_size
    prefills = 0
    for gi, group in enumerate(groups):
        counted = gi >= warmup
        n_steps = gen_len if counted or warmup_tokens is None else min(gen_len, warmup_tokens)
        batch, running, nxt = KVBatch(), [], {}
        for kind, rows in schedule(group, n_steps, gap):
            if kind == "end":
                keep = [i for i, r in enumerate(running) if r not in rows]
                batch.keep(keep)
                running = [running[i] for i in keep]
                if offloader is not None:
                    for r in rows:
                        offloader.end_sequence(f"g{gi}r{r}")
                continue
            if kind == "prefill":
                (r,) = rows
                gen = torch.Generator(device=device).manual_seed(1000 * gi + r)
                ids = torch.randint(0, vocab, (1, P), device=device, generator=gen)
                routes, picks = forward_routing(traces, kind, rows)
                routes_t = torch.as_tensor(routes[0], device=device)  # [L, P, k]
                feed.indices = [routes_t[l] for l in range(L)]
                feed.weights = torch.full((P, k), 1.0 / k, dtype=model.dtype, device=device)
                if lookahead:
                    feed.set_lookahead_prefill(picks, device)
                cache = DynamicCache(config=model.config)
                s0 = _snap(offloader)
                if offloader is not None:
                    offloader.begin_forward([f"g{gi}r{r}"], "prefill")
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                best = out.logits[0, -1].max(-1)
                nxt[r] = int(best.indices)
                _sync(device)
                if counted:
                    ttft.append(time.perf_counter() - t0)
                    prefills += 1
                    for key, v in _delta(s0, _snap(offloader)).items():
                        phase_stats["prefill"][key] += v
                batch.add(cache, P)
                running.append(r)
                tokens[f"g{gi}r{r}"] = [nxt[r]]
                logits[f"g{gi}r{r}"] = [float(best.values)]
                continue
            assert [r for r, _ in rows] == running, "the schedule's decode rows are the running batch, in order"
            B = len(rows)
            routes, picks = forward_routing(traces, kind, rows)
            routes_t = torch.as_tensor(routes[:, :, 0], device=device)  # [B, L, k]
            feed.indices = [routes_t[:, l] for l in range(L)]
            feed.weights = torch.full((B, k), 1.0 / k, dtype=model.dtype, device=device)
            if lookahead:
                feed.set_lookahead_step(picks, device)
            mask, positions = batch.step_inputs(device)
            ids = torch.tensor([[nxt[r]] for r in running], device=device)
            s0 = _snap(offloader)
            if offloader is not None:
                offloader.begin_forward([f"g{gi}r{r}" for r in running], "decode")
            ts = time.perf_counter()
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=batch.cache, use_cache=True, logits_to_keep=1)
            batch.advance()
            best = out.logits[:, -1].max(-1)
            picked, values = best.indices.tolist(), best.values.tolist()
            _sync(device)
            if counted:
                steps.append(time.perf_counter() - ts)
                sizes.append(B)
                for key, v in _delta(s0, _snap(offloader)).items():
                    phase_stats["decode"][key] += v
            for r, tok, value in zip(running, picked, values):
                nxt[r] = tok
                tokens[f"g{gi}r{r}"].append(tok)
                logits[f"g{gi}r{r}"].append(value)
        del batch
    return {"ttft_s": statistics.mean(ttft), "tpot_s": statistics.mean(steps),
            "tpot_median_s": statistics.median(steps), "decode_steps": len(steps), "groups": len(groups) - warmup,
            "prefill_forwards": prefills, "mean_decode_batch": statistics.mean(sizes), "arrival_gap": gap,
            "phase_stats": phase_stats, "wall_s": time.perf_counter() - wall, "tokens": tokens, "logits": logits}


def measure_h2d(device, nbytes: int = 1 << 30, reps: int = 10) -> dict:
    """Host-to-device copy bandwidth, pinned and pageable, median of ``reps`` (CUDA events)."""
    if device.type != "cuda":
        return {"pinned_GBps": float("nan"), "pageable_GBps": float("nan")}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, pin in (("pinned", True), ("pageable", False)):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
        times = []
        for _ in range(reps + 2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=pin)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        out[f"{name}_GBps"] = nbytes / statistics.median(times[2:]) / 1e9
        del src
    del dst
    return out


def groups_for(traces: Traces, batch: int, n_groups: int) -> list[list[int]]:
    ev = [int(r) for r in traces.indices("eval")]
    need = batch * n_groups
    if len(ev) < need:
        raise ValueError(f"{len(ev)} eval requests in the trace file; {n_groups} groups of {batch} need {need}")
    return [ev[i * batch:(i + 1) * batch] for i in range(n_groups)]


def shifted_groups(traces: Traces, batch: int, before: int, after: int, shift: str, seed: int = 0) -> list[list[int]]:
    """A request mix that shifts: ``before`` groups of ``batch`` requests drawn from category ``A`` then ``after``
    from ``B`` (``shift`` = "A,B": the trace's categories, python / doc / man), any split, each group without
    repeats. The benchmark counts only the groups after the shift (``--warmup`` = ``before``)."""
    names = shift.split(",")
    if len(names) != 2 or any(n not in set(traces.category.tolist()) for n in names):
        raise ValueError(f"--shift wants two of the trace's categories {sorted(set(traces.category.tolist()))}, "
                         f"as A,B; got {shift!r}")
    rng = np.random.default_rng(seed)
    pools = [np.flatnonzero(traces.category == n) for n in names]
    if min(len(p) for p in pools) < batch:
        raise ValueError(f"--shift: a category has fewer than {batch} requests")
    return [[int(r) for r in rng.choice(pools[0 if i < before else 1], batch, replace=False)]
            for i in range(before + after)]


def min_moved(args, traces: Traces, groups: list[list[int]], num_slots: int) -> float:
    """Experts Belady's MIN copies per decode step on this replay (``tools/offload_oracle``): no policy copies
    fewer. Once per batch and cache size (the policies of a run share it)."""
    return _min_moved(traces, tuple(map(tuple, groups)), args.new_tokens, args.warmup, args.warmup_tokens, num_slots,
                      args.arrival_gap)


@functools.lru_cache(maxsize=64)
def _min_moved(traces, groups: tuple, new_tokens: int, warmup: int, warmup_tokens, num_slots: int,
               gap: int) -> float:
    return min_moved_per_step(traces, [list(g) for g in groups], new_tokens, warmup, warmup_tokens, num_slots, gap)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_shape(args, traces: Traces, device, log, save=lambda results: None) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    bench = Bench(args.shape, traces, device, dtype, small=args.small, host_layers=args.host_layers)
    results = []
    t_build = time.perf_counter()
    model, feed, modules = bench.build()
    if len(modules) != traces.layers or modules[0].num_experts != traces.num_experts:
        raise ValueError(f"trace file is {traces.layers} x {traces.num_experts}; the {args.shape} model has "
                         f"{len(modules)} x {modules[0].num_experts}")
    store = bench.host_store(modules)
    slot_bytes = store.layout.slot_bytes
    log(f"[{args.shape}] built in {time.perf_counter() - t_build:.1f}s: {len(modules)} MoE layers x "
        f"{modules[0].num_experts} experts, {slot_bytes / 2**20:.2f} MiB per expert slot, host tier "
        f"{store.total_bytes / 1e9:.1f} GB ({args.host_layers or len(modules)} distinct layers pinned)")
    tmp = tempfile.mkdtemp(prefix="bench-eamc-")
    eamc_master = os.path.join(tmp, "eamc.npy")
    n_eamc = eamc_file(traces, args.new_tokens, args.eamc_capacity, eamc_master)
    common = dict(shape=args.shape, slot_bytes=slot_bytes, layers=len(modules),
                  experts=modules[0].num_experts, top_k=traces.top_k, new_tokens=args.new_tokens,
                  prompt_len=traces.prompt_len, eamc_entries=n_eamc)

    for batch in args.batch:
        n_groups = args.warmup + (args.groups_b1 if batch == 1 else args.groups_bn)
        groups = groups_for(traces, batch, n_groups)
        gap = args.arrival_gap if batch > 1 else 0

        def run(off, lookahead: bool) -> dict:
            if gap:
                return run_continuous(model, feed, traces, groups, args.new_tokens, device, off, args.warmup,
                                      lookahead, gap, warmup_tokens=args.warmup_tokens)
            return run_requests(model, feed, traces, groups, args.new_tokens, device, off, args.warmup, lookahead,
                                warmup_tokens=args.warmup_tokens)

        def run_resident(when: str) -> None:
            for m in modules:  # an earlier offloader (and its cache pool) stays alive through this handle
                if hasattr(m, HANDLE_ATTR):
                    delattr(m, HANDLE_ATTR)
            _free(device)
            bench.make_resident(modules)
            model.set_experts_implementation("grouped_mm")
            r = run(None, False)
            bench.drop_resident(modules)
            _free(device)
            res = dict(common, policy="resident", batch=batch, budget_pct=100, measured=when,
                       **_summary(r, slot_bytes))
            results.append(res)
            log(_line(res))
            save(results)

        if "resident" in args.policies:
            run_resident("before")
        if "accelerate" in args.policies and not gap:  # Accelerate's baseline runs lockstep batches only
            try:
                results += bench_accelerate(args, bench, traces, common, log, batch)
            except Exception as e:  # noqa: BLE001 -- a baseline's failure must not lose the engine's results
                log(f"accelerate baseline failed: {type(e).__name__}: {e}")
            save(results)
        policies = [p for p in args.policies if p in POLICIES]
        for budget in (args.budgets if batch == 1 or not args.budgets_bn else args.budgets_bn):
            runs: dict[str, list[dict]] = {p: [] for p in policies}
            for rnd in range(args.rounds):  # odd rounds in reverse order: no policy always runs first
                for policy in (policies if rnd % 2 == 0 else policies[::-1]):
                    off, lookahead = attach_policy(policy, budget, args.eamc_capacity,
                                                   os.path.join(tmp, f"eamc-{policy}-{batch}-{budget}.npy"),
                                                   eamc_master, bench, model, modules, store, feed, device)
                    if args.prefetch_window_mib is not None:
                        off.set_prefetch_window(int(args.prefetch_window_mib * 2**20) // slot_bytes)
                    r = run(off, lookahead)
                    off.close()
                    res = dict(common, policy=policy, batch=batch, budget_pct=budget, num_slots=off.num_slots,
                               **_summary(r, slot_bytes),
                               min_moved_per_step=min_moved(args, traces, groups, off.num_slots))
                    del off
                    _free(device)
                    runs[policy].append(res)
                    log(_line(res) + (f"  [round {rnd + 1}/{args.rounds}]" if args.rounds > 1 else ""))
                    save(results + [median_round(v) for v in runs.values() if v])
            results.extend(median_round(v) for v in runs.values())
            save(results)
        if "resident" in args.policies and any(p in POLICIES for p in args.policies):
            # the baseline again once the policies have run: the machine's drift within the run, and ratios
            # taken against the mean of both
            run_resident("after")
    del model, store
    _free(device)
    shutil.rmtree(tmp, ignore_errors=True)
    return results


def median_round(rounds: list[dict]) -> dict:
    """One row for a policy run in several rounds: the round with the median time per token (the lower middle
    of an even count), with every round's time per token beside it."""
    row = dict(sorted(rounds, key=lambda r: r["tpot_s"])[(len(rounds) - 1) // 2])
    if len(rounds) > 1:
        row["tpot_rounds_s"] = [r["tpot_s"] for r in rounds]
    return row


def bench_accelerate(args, bench: Bench, traces: Traces, common: dict, log, batch: int) -> list[dict]:
    """HF Accelerate ``dispatch_model`` with whole experts modules offloaded to the CPU (its granularity): the
    first ``budget`` share of the MoE layers keep their experts on the GPU. Run on ``accelerate_layers`` MoE
    layers (the others' cost is the same per layer), time per token scaled by ``layers / accelerate_layers``."""
    from accelerate import dispatch_model

    out = []
    La = args.accelerate_layers
    for batch in [batch]:
        groups = groups_for(traces, batch, args.warmup + 1)
        for budget in args.accelerate_budgets:
            full_shapes = bench.expert_shapes  # build() records the reduced model's; the full one's come back below
            model, feed, modules = bench.build(La)
            bench.expert_shapes = full_shapes
            names = [n for n, _ in _experts_modules(model)]
            on_gpu = int(budget / 100 * La + 1e-9)
            for i, m in enumerate(modules):
                for name, p in list(m._parameters.items()):
                    t = bench.random_bytes(p.numel() * p.element_size(), seed=300 + i).view(p.dtype).view(p.shape)
                    m._parameters[name] = torch.nn.Parameter(t.cpu() if i >= on_gpu else t, requires_grad=False)
            dev = (bench.device.index or 0) if bench.device.type == "cuda" else "cpu"
            device_map = {}

            def assign(module, prefix):  # experts modules by budget; everything else on the GPU, as coarse as can be
                for cname, child in module.named_children():
                    full = f"{prefix}.{cname}" if prefix else cname
                    if full in names:
                        device_map[full] = dev if names.index(full) < on_gpu else "cpu"
                    elif any(n.startswith(full + ".") for n in names):
                        assign(child, full)
                    else:
                        device_map[full] = dev

            assign(model, "")
            model.set_experts_implementation("grouped_mm")
            model = dispatch_model(model, device_map=device_map, main_device=dev)
            gen = min(args.accelerate_tokens, args.new_tokens)
            r = run_requests(model, feed, traces, groups, gen, bench.device, None, args.warmup, False,
                             warmup_tokens=min(gen, args.warmup_tokens or gen))
            scale = common["layers"] / La
            res = dict(common, policy="accelerate", batch=batch, budget_pct=budget, accelerate_layers=La,
                       accelerate_experts_layers_on_gpu=on_gpu, new_tokens=gen, scale=scale,
                       **_summary(r, common["slot_bytes"]))
            res["measured_tpot_s"], res["measured_ttft_s"] = res["tpot_s"], res["ttft_s"]
            res["tpot_s"], res["ttft_s"] = res["tpot_s"] * scale, res["ttft_s"] * scale
            out.append(res)
            log(_line(res))
            del model, feed, modules
            _free(bench.device)
    return out


def _summary(r: dict, slot_bytes: int) -> dict:
    dec, pre = r["phase_stats"]["decode"], r["phase_stats"]["prefill"]
    steps = max(1, r["decode_steps"])
    d = {"ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"], "tpot_median_s": r["tpot_median_s"],
         "decode_steps": r["decode_steps"], "groups": r["groups"], "wall_s": r["wall_s"]}
    for name, s in (("decode", dec), ("prefill", pre)):
        for key, v in rates(s).items():
            d[f"{name}_{key}"] = v
    d["decode_uses_per_step"] = dec["uses"] / steps
    d["decode_misses_per_step"] = dec["misses"] / steps
    d["decode_demand_bytes_per_step"] = dec["demand_bytes"] / steps
    d["decode_prefetch_bytes_per_step"] = dec["prefetch_bytes"] / steps
    d["decode_stall_s_per_step"] = dec["stall_s"] / steps
    d["decode_host_s_per_step"] = dec["host_s"] / steps  # offloader CPU time after each layer's routing read-back
    d.update(_per_layer(dec, steps))
    prefills = max(1, r.get("prefill_forwards", r["groups"]))  # a lockstep group is one prefill forward
    d["prefill_demand_bytes"] = pre["demand_bytes"] / prefills
    d["prefill_prefetch_bytes"] = pre["prefetch_bytes"] / prefills
    for key in ("arrival_gap", "mean_decode_batch", "prefill_forwards"):
        if key in r:
            d[key] = r[key]
    return d


def _line(r: dict) -> str:
    return (f"  {r['policy']:>10} B={r['batch']} budget={r['budget_pct']:>3}%  TPOT {r['tpot_s'] * 1e3:8.2f} ms  "
            f"TTFT {r['ttft_s'] * 1e3:8.1f} ms  hit {r['decode_hit_rate']:.3f}  prec "
            f"{r['decode_prefetch_precision']:.3f}  rec {r['decode_prefetch_recall']:.3f}  "
            f"miss/step {r['decode_misses_per_step']:.1f}  ({r['wall_s']:.0f}s)")


def add_bounds(results: list[dict], h2d_GBps: float) -> None:
    """Per result: the physical bound ``(1 - hit) x expert bytes used per step / H2D`` (= demand bytes per step
    / H2D), the same with every byte moved (prefetches too), the floor no eviction policy goes below (Belady's
    MIN's experts moved, ``tools/offload_oracle``), and the issue's ratios."""
    # the all-resident time: the mean of its measurements in the run (before and after the policies)
    measured: dict[tuple, list[float]] = {}
    for r in results:
        if r["policy"] == "resident":
            measured.setdefault((r["shape"], r["batch"]), []).append(r["tpot_s"])
    resident = {key: statistics.mean(v) for key, v in measured.items()}
    for r in results:
        if r["policy"] == "resident" and len(measured[(r["shape"], r["batch"])]) > 1:
            v = measured[(r["shape"], r["batch"])]
            r["resident_tpot_mean_s"], r["resident_drift"] = resident[(r["shape"], r["batch"])], max(v) / min(v)
    by = {(r["shape"], r["batch"], r["budget_pct"], r["policy"]): r for r in results if r["policy"] != "resident"}
    for r in results:
        bw = h2d_GBps * 1e9
        r["bound_transfer_s"] = (1 - r["decode_hit_rate"]) * r["decode_uses_per_step"] * r["slot_bytes"] / bw
        r["bound_all_bytes_s"] = (r["decode_demand_bytes_per_step"] + r["decode_prefetch_bytes_per_step"]) / bw
        if r["bound_all_bytes_s"]:
            r["tpot_over_all_bytes"] = r["tpot_s"] / r["bound_all_bytes_s"]  # the engine's overhead over its copies
        if "min_moved_per_step" in r:
            r["bound_min_transfer_s"] = r["min_moved_per_step"] * r["slot_bytes"] / bw
        res = resident.get((r["shape"], r["batch"]))
        if res is not None:
            if "bound_min_transfer_s" in r:
                r["floor_s"] = max(res, r["bound_min_transfer_s"])
                r["tpot_over_floor"] = r["tpot_s"] / r["floor_s"]
            r["bound_s"] = max(res, r["bound_transfer_s"])
            r["tpot_over_bound"] = r["tpot_s"] / r["bound_s"]
            r["tpot_over_resident"] = r["tpot_s"] / res
        if r["policy"] == "activation":
            for base in ("lru", "lfu", "lookahead", "accelerate"):
                b = by.get((r["shape"], r["batch"], r["budget_pct"], base))
                if b is not None:
                    r[f"speedup_vs_{base}"] = b["tpot_s"] / r["tpot_s"]


def table(results: list[dict]) -> str:
    rows = ["| shape | batch | budget | policy | TPOT ms | TTFT ms | decode hit | precision | recall | "
            "bound ms | TPOT / bound | TPOT / resident | TPOT / moved | MIN floor ms |", "|" + " --- |" * 14]
    for r in results:
        f = lambda k, s=1.0, fmt="{:.2f}": fmt.format(r[k] * s) if k in r else "–"  # noqa: E731
        policy = r["policy"] + (f" ({r['measured']})" if "resident_drift" in r else "")
        rows.append(f"| {r['shape']} | {r['batch']} | {r['budget_pct']}% | {policy} | {f('tpot_s', 1e3)} | "
                    f"{f('ttft_s', 1e3, '{:.0f}')} | {f('decode_hit_rate', 1, '{:.3f}')} | "
                    f"{f('decode_prefetch_precision', 1, '{:.3f}')} | {f('decode_prefetch_recall', 1, '{:.3f}')} | "
                    f"{f('bound_s', 1e3)} | {f('tpot_over_bound')} | {f('tpot_over_resident')} | "
                    f"{f('tpot_over_all_bytes')} | {f('floor_s', 1e3)} |")
    return "\n".join(rows)


def plot(results: list[dict], prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for shape in sorted({r["shape"] for r in results}):
        batches = sorted({r["batch"] for r in results if r["shape"] == shape})
        fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
        for j, b in enumerate(batches):
            rs = [r for r in results if r["shape"] == shape and r["batch"] == b]
            budgets = sorted({r["budget_pct"] for r in rs if r["policy"] in POLICIES})
            for policy in POLICIES:
                pts = sorted((r["budget_pct"], r["tpot_s"] * 1e3, r["decode_hit_rate"]) for r in rs
                             if r["policy"] == policy)
                if pts:
                    axes[0, j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=policy)
                    axes[1, j].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=policy)
            bound = sorted((r["budget_pct"], r["bound_s"] * 1e3) for r in rs if r["policy"] == "activation"
                           and "bound_s" in r)
            if bound:
                axes[0, j].plot([p[0] for p in bound], [p[1] for p in bound], "k--", label="bound (activation)")
            for r in rs:
                if r["policy"] == "resident" and r.get("measured") != "after":  # one line: the mean of both
                    axes[0, j].axhline(r.get("resident_tpot_mean_s", r["tpot_s"]) * 1e3, color="gray", ls=":",
                                       label="all resident")
                if r["policy"] == "accelerate":
                    axes[0, j].plot([r["budget_pct"]], [r["tpot_s"] * 1e3], "rx", ms=10,
                                    label="accelerate (scaled)")
            axes[0, j].set_yscale("log")
            axes[0, j].set_title(f"{shape}, batch {b}: time per output token")
            axes[0, j].set_ylabel("ms")
            axes[1, j].set_title(f"{shape}, batch {b}: decode hit rate")
            axes[1, j].set_xlabel("GPU expert budget (% of routed experts)")
            for ax in axes[:, j]:
                ax.set_xticks(budgets)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{prefix}_{shape}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_decisions(results: list[dict], path: str) -> str:
    """``--host-time`` results as grouped bars: decode hit rate per policy, one panel per shape and batch, one
    group per budget; prefetch precision printed on each bar that prefetches. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["shape"], r["batch"]) for r in results})
    policies = [p for p in POLICIES if any(r["policy"] == p for r in results)]
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.5 * rows), squeeze=False)
    width = 0.8 / max(1, len(policies))
    for ax, (shape, batch) in zip(axes.ravel(), panels):
        rs = {(r["policy"], r["budget_pct"]): r for r in results if (r["shape"], r["batch"]) == (shape, batch)}
        budgets = sorted({b for _, b in rs})
        for i, policy in enumerate(policies):
            xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(budgets))]
            cells = [rs.get((policy, b)) for b in budgets]
            bars = ax.bar(xs, [c["decode_hit_rate"] if c else 0 for c in cells], width, label=policy)
            for bar, c in zip(bars, cells):
                if c and c.get("decode_prefetches_per_step"):
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01,
                            f"{c['decode_prefetch_precision']:.2f}", ha="center", fontsize=6, rotation=90)
        ax.set_xticks(range(len(budgets)), [f"{b}%" for b in budgets])
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{shape}, batch {batch}: decode hit rate (prefetch precision above)", fontsize=10)
        ax.set_xlabel("GPU expert budget (% of routed experts)")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    axes.ravel()[min(1, len(panels) - 1)].legend(fontsize=8, loc="upper left")  # batch 8: room above its bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_copies(results: list[dict], path: str) -> str:
    """``--host-time`` results as grouped bars: experts copied per decode step (top) and per prefill (bottom), per
    policy, one group per shape x batch x arrival gap; Belady's MIN per decode step as a black tick over each
    group (no policy copies fewer). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = lambda r: (r["shape"], r["batch"], r.get("arrival_gap", 0), r["budget_pct"])  # noqa: E731
    groups = sorted({key(r) for r in results})
    policies = list(dict.fromkeys(r["policy"] for r in results))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 1.6 * len(groups) * max(1, len(policies)) / 3), 8))
    width = 0.8 / max(1, len(policies))
    for i, policy in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(groups))]
        cells = [next((r for r in results if r["policy"] == policy and key(r) == g), None) for g in groups]
        top.bar(xs, [c["moved_per_step"] if c else 0 for c in cells], width, label=policy)
        bottom.bar(xs, [c.get("prefill_moved_per_request", 0) if c else 0 for c in cells], width, label=policy)
    for j, g in enumerate(groups):
        floor = [r["min_moved_per_step"] for r in results if key(r) == g and r.get("min_moved_per_step")]
        if floor:
            top.hlines(floor[0], j - 0.45, j + 0.45, colors="black", linewidth=2, label="MIN" if j == 0 else None)
    labels = [f"{shape} B{batch}\n{'continuous, gap ' + str(gap) if gap else 'lockstep'}\n{budget}%"
              for shape, batch, gap, budget in groups]
    for ax, what in ((top, "experts copied per decode step (MIN: black)"),
                     (bottom, "experts copied per request's prefill (a lockstep batch's requests prefill together)")):
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.set_title(what, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge(paths: list[str], out: str, plot_prefix: str | None) -> int:
    runs = [json.load(open(p)) for p in paths]
    results = [r for run in runs for r in run["results"]]
    bw = statistics.median(run["env"]["h2d"]["pinned_GBps"] for run in runs)
    add_bounds(results, bw)
    with open(out, "w") as f:
        json.dump({"runs": [run["env"] for run in runs], "h2d_pinned_GBps_median": bw, "results": results}, f,
                  indent=1)
    print(table(results))
    if plot_prefix:
        print("plots: " + ", ".join(plot(results, plot_prefix)))
    return 0


# ------------------------------------------------------------------------------------- host time (CPU, seconds)
class SyntheticTraces(Traces):
    """Routing of a trace file's shape without a trained model, for measuring the offloader's host time where no
    trace file is at hand: requests fall into ``clusters`` groups that share skewed per-layer expert preferences
    (plus per-request noise), and each token draws its top-k from its request's preferences (Gumbel top-k).
    ``lookahead`` = the next layer's real picks with one pick in five replaced at random. Not a substitute for
    learned routing when comparing hit rates."""

    def __init__(self, layers: int, num_experts: int, top_k: int, requests: int = 48, prompt_len: int = 512,
                 gen_len: int = 32, clusters: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        L, E, k, R, T = layers, num_experts, top_k, requests, prompt_len + gen_len
        centres = rng.normal(0.0, 1.5, (clusters, L, E))
        experts = np.empty((R, L, T, k), dtype=np.uint8 if E <= 256 else np.int16)
        for r in range(R):
            logits = centres[r % clusters] + rng.normal(0.0, 1.0, (L, E))
            noisy = logits[:, None, :] + rng.gumbel(size=(L, T, E))
            top = np.argpartition(-noisy, k - 1, axis=-1)[..., :k]
            experts[r] = np.sort(top, axis=-1)
        self.path = None
        self.experts = experts
        nxt = experts[:, 1:, prompt_len:].astype(np.int64)  # [R, L-1, G, k]
        swap = rng.random(nxt.shape) < 0.2
        self.lookahead = np.where(swap, rng.integers(0, E, nxt.shape), nxt)
        ids = experts[:, 1:, :prompt_len].astype(np.int64).reshape(R, L - 1, -1)
        self.lookahead_prefill = np.stack([[np.bincount(ids[r, l], minlength=E) for l in range(L - 1)]
                                           for r in range(R)])
        self.category = np.array(["synthetic"] * R)
        # one in three replayed; clusters and splits are coprime, so every cluster has requests in both
        self.split = np.array(["eval" if r % 3 == 2 else "eamc" for r in range(R)])
        self.prompt_len, self.gen_len, self.num_experts = prompt_len, gen_len, E
        self.meta = {"synthetic": True, "clusters": clusters, "seed": seed}
        self.requests, self.layers, self.top_k = R, L, k


def host_time(args, traces: Traces, log, save=lambda results: None) -> list[dict]:
    """The offloader's host (CPU) time per decode step, without the model around it: the real ``Offloader``
    (cache, policies, prediction, copies, grouped_mm on the cache pool) at the real layer x expert x top-k
    counts, tiny expert widths, driven layer by layer with the trace's routing on random hidden states.
    ``--compute`` picks what the expert arithmetic costs (see its help)."""
    from tritonmoe.backend.offload import offloader as offloader_mod

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bench = Bench(args.shape, traces, device, dtype, small=True, host_layers=args.host_layers)
    model, feed, modules = bench.build()
    store = bench.host_store(modules)
    L, E, k, H = traces.layers, traces.num_experts, traces.top_k, model.config.hidden_size
    tmp = tempfile.mkdtemp(prefix="bench-eamc-")
    eamc_master = os.path.join(tmp, "eamc.npy")
    n_eamc = eamc_file(traces, args.new_tokens, args.eamc_capacity, eamc_master)
    window = full_size_prefetch_window(args.shape, args.prefetch_window_mib)
    log(f"  prefetch window {window} experts (full-size {args.shape} experts, bf16)")
    real_compute = offloader_mod.weighted_pair_outputs
    if args.compute == "none":
        offloader_mod.weighted_pair_outputs = lambda module, views, pair_inputs, *a, **kw: torch.zeros_like(
            pair_inputs)
    elif args.compute == "compact":
        def compact(module, views, pair_inputs, pair_slots, pair_weights, used_slots, first_slot=0):
            # the same kernels on a bank of only the slots used (the CPU's grouped_mm costs O(bank width), a GPU's
            # launches do not): the weights read are the wrong ones, the work issued is the real work
            used, inverse = torch.unique(pair_slots, return_inverse=True)
            return real_compute(module, views, pair_inputs, inverse, pair_weights, used_slots=len(used),
                                first_slot=0)
        offloader_mod.weighted_pair_outputs = compact
    results = []

    try:
        for batch in args.batch:
            n_groups = args.warmup + (args.groups_b1 if batch == 1 else args.groups_bn)
            groups = (shifted_groups(traces, batch, args.warmup, n_groups - args.warmup, args.shift) if args.shift
                      else groups_for(traces, batch, n_groups))
            for budget in (args.budgets if batch == 1 or not args.budgets_bn else args.budgets_bn):
                for policy in [p for p in args.policies if p in POLICIES]:
                    off, lookahead = attach_policy(policy, budget, args.eamc_capacity,
                                                   os.path.join(tmp, f"eamc-{policy}-{batch}-{budget}.npy"),
                                                   eamc_master, bench, model, modules, store, feed, device,
                                                   args.frequency_half_life)
                    off.set_prefetch_window(window)  # what the full-size experts get, not the tiny ones
                    r = _drive_offloader(off, modules, feed, traces, groups, args, lookahead, H, dtype, device)
                    off.close()
                    res = dict(shape=args.shape, layers=L, experts=E, top_k=k, hidden=H, policy=policy,
                               batch=batch, budget_pct=budget, num_slots=off.num_slots, eamc_entries=n_eamc,
                               compute=args.compute, shift=args.shift,
                               frequency_half_life=off.config.eviction_frequency_half_life, **r)
                    res["moved_per_step"] = res["decode_misses_per_step"] + res["decode_prefetches_per_step"]
                    res["min_moved_per_step"] = min_moved(args, traces, groups, off.num_slots)
                    results.append(res)
                    log(f"  {policy:>10} B={batch} budget={budget:>3}%  host {res['host_ms_per_token']:7.2f} ms/token "
                        f"= {res['host_ms_per_layer']:.3f} ms/layer (median step {res['host_ms_per_token_median']:.2f})"
                        f"  driver {res['wall_ms_per_token']:7.2f} ms/token  hit {res['decode_hit_rate']:.3f}  prec "
                        f"{res['decode_prefetch_precision']:.3f}  rec {res['decode_prefetch_recall']:.3f}  moved "
                        f"{res['moved_per_step']:.1f}/step (MIN {res['min_moved_per_step']:.1f})" +
                        (f"  mean batch {res['mean_decode_batch']:.2f}, prefill moved "
                         f"{res['prefill_moved_per_request']:.0f}/request" if res["arrival_gap"] else ""))
                    save(results)
                    for m in modules:
                        delattr(m, HANDLE_ATTR)
                    del off
    finally:
        offloader_mod.weighted_pair_outputs = real_compute
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def prediction_precision(traces: Traces, gen_len: int = 32, capacity: int = 120, top_matches: int = 4,
                         requests: int = 8) -> dict:
    """How well the next layer's experts are predicted, apart from any cache: at every decode layer ``l`` of the
    first ``requests`` eval requests, the top-k experts of layer ``l + 1`` by (a) the offloader's EAMC prediction
    (the EAMC filled from the ``eamc`` requests, as in the benchmark), (b) global popularity (decode uses over the
    ``eamc`` requests), (c) the request's own decode so far; precision@k = share of the k picked that the token
    really used."""
    from tritonmoe.backend.offload.eam import ActivationPredictor, ActivationTracer

    L, E, k, P = traces.layers, traces.num_experts, traces.top_k, traces.prompt_len
    coll = EAMCollection(capacity, L, E)
    eamc_eams = [traces.eam(r, gen_len) for r in traces.indices("eamc")]
    for eam in eamc_eams:
        coll.add(eam)
    popularity = np.sum([eam[1] for eam in eamc_eams], axis=0)
    predictor, tracer = ActivationPredictor(coll, top_matches), ActivationTracer(L, E)
    hits = {"eamc": [], "popularity": [], "own_history": []}

    def top(row):
        return set(np.argsort(-row, kind="stable")[:k].tolist())

    for r in traces.indices("eval")[:requests]:
        sid = f"r{r}"
        tracer.begin_forward([sid], "prefill")
        for layer in range(L):
            tracer.record(layer, np.bincount(traces.experts[r, layer, :P].astype(np.int64).ravel(), minlength=E)[None])
        for t in range(min(gen_len, traces.gen_len)):
            eams = tracer.begin_forward([sid], "decode")
            predictor.begin_forward(eams, "decode")
            history = eams[0].copy()  # the decode before this token
            for layer in range(L):
                tracer.record(layer, np.bincount(traces.experts[r, layer, P + t].astype(np.int64), minlength=E)[None])
                predictor.observe(layer)
                if layer + 1 == L:
                    continue
                used = set(traces.experts[r, layer + 1, P + t].tolist())
                hits["eamc"].append(len(used & top(predictor.prediction[layer + 1])) / k)
                hits["popularity"].append(len(used & top(popularity[layer + 1])) / k)
                if t:
                    hits["own_history"].append(len(used & top(history[layer + 1])) / k)
        tracer.finish(sid)
    return {f"precision_at_k_{name}": float(np.mean(v)) for name, v in hits.items()}


def full_size_prefetch_window(shape: str, window_mib: float | None = None) -> int:
    """The offloader's prefetch window for the full-size model's bf16 experts (built on the meta device);
    ``window_mib``: that many MiB instead of the offloader's ``PREFETCH_WINDOW_BYTES``."""
    import transformers as tf

    from tritonmoe.backend.offload.offloader import PREFETCH_WINDOW_BYTES

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(make_config(shape, layers=1), dtype=torch.bfloat16)
    slot_bytes = ExpertLayout.of_experts_module(_experts_modules(model)[0][1]).slot_bytes
    if window_mib is not None:
        return max(1, int(window_mib * 2**20) // slot_bytes)
    return max(2, PREFETCH_WINDOW_BYTES // slot_bytes)


@torch.no_grad()
def _drive_offloader(off, modules, feed: Feed, traces: Traces, groups, args, lookahead: bool, hidden: int, dtype,
                     device) -> dict:
    L, P, k = len(modules), traces.prompt_len, traces.top_k
    gen = torch.Generator(device=device).manual_seed(0)
    host, wall, batch_sizes = [], [], []
    dec_stats = {key: 0 for key in _KEYS}
    prefill_moved, prefills = 0.0, 0
    gap = args.arrival_gap
    for gi, group in enumerate(groups):
        counted = gi >= args.warmup
        steps = args.new_tokens if counted or args.warmup_tokens is None else min(args.new_tokens,
                                                                                  args.warmup_tokens)
        for kind, rows in schedule(group, steps, gap):
            if kind == "end":
                for r in rows:
                    off.end_sequence(f"g{gi}r{r}")
                continue
            routes, picks = forward_routing(traces, kind, rows)
            routes = torch.as_tensor(routes, device=device)  # [B, L, T, k]
            if kind == "prefill":
                B = len(rows)
                s0 = _snap(off)
                off.begin_forward([f"g{gi}r{r}" for r in rows], "prefill")
                if lookahead:
                    feed.set_lookahead_prefill(picks, device)
                x = torch.randn(B * P, hidden, generator=gen, device=device, dtype=dtype)
                w = torch.full((B * P, k), 1.0 / k, dtype=dtype, device=device)
                for layer in range(L):
                    off.run_experts(layer, modules[layer], x, routes[:, layer].reshape(B * P, k), w)
                if counted:
                    d = _delta(s0, _snap(off))
                    prefill_moved += d["misses"] + d["prefetches"]
                    prefills += B
                continue
            B = len(rows)
            ids = [r for r, _ in rows]
            if lookahead:
                feed.set_lookahead_step(picks, device)
            w = torch.full((B, k), 1.0 / k, dtype=dtype, device=device)
            x = torch.randn(B, hidden, generator=gen, device=device, dtype=dtype)
            s0 = _snap(off)
            ts = time.perf_counter()
            off.begin_forward([f"g{gi}r{r}" for r in ids], "decode")
            for layer in range(L):
                off.run_experts(layer, modules[layer], x, routes[:, layer, 0], w)
            _sync(device)
            te = time.perf_counter()
            d = _delta(s0, _snap(off))
            if counted:
                wall.append(te - ts)
                host.append(d["host_s"])
                batch_sizes.append(B)
                for key, v in d.items():
                    dec_stats[key] += v
    decode_rates = rates(dec_stats)
    steps = max(1, len(host))
    return {"host_ms_per_token": 1e3 * sum(host) / steps, "host_ms_per_layer": 1e3 * sum(host) / steps / L,
            "host_ms_per_token_median": 1e3 * statistics.median(host) if host else 0.0,
            "host_ms_per_token_p25": 1e3 * float(np.percentile(host, 25)) if host else 0.0,
            "wall_ms_per_token": 1e3 * sum(wall) / steps, "decode_steps": len(host),
            "arrival_gap": gap, "mean_decode_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
            "prefill_moved_per_request": prefill_moved / max(1, prefills),
            **{f"decode_{key}": v for key, v in decode_rates.items()},
            "decode_uses_per_step": dec_stats["uses"] / steps, "decode_misses_per_step": dec_stats["misses"] / steps,
            "decode_prefetches_per_step": dec_stats["prefetches"] / steps, **_per_layer(dec_stats, steps)}


def main_host_time(a, argv) -> int:
    if not a.shape or (a.traces and len(a.traces) != len(a.shape)):
        raise SystemExit("--host-time: give --shape (and optionally one --traces per --shape)")
    if a.device == "cuda" and not torch.cuda.is_available():
        a.device = "cpu"
    if a.dtype == "bfloat16" and a.device == "cpu":
        a.dtype = "float32"
    threads = torch.get_num_threads()
    if a.device == "cpu":
        torch.set_num_threads(1)  # the host work is one thread's; intra-op threads only add contention noise
    try:
        return _main_host_time(a, argv)
    finally:
        torch.set_num_threads(threads)


def _main_host_time(a, argv) -> int:
    from tritonmoe.tools.train_routing import SHAPES

    env = {"command": "python -m tritonmoe.tools.bench_offload " + " ".join(argv if argv is not None else
                                                                           __import__("sys").argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__, "device": a.device,
           "dtype": a.dtype, "torch_threads": torch.get_num_threads()}
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(json.dumps(env))
    results = []
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def save(rs):
        with open(a.out, "w") as f:
            json.dump({"env": env, "results": rs}, f, indent=1)

    for i, shape in enumerate(a.shape):
        if a.traces:
            traces = Traces(a.traces[i])
        else:
            layers, experts, top_k, _ = SHAPES[shape]
            traces = SyntheticTraces(layers, experts, top_k, gen_len=max(a.new_tokens, 1))
        log(f"[{shape}] {traces.layers} MoE layers x {traces.num_experts} experts, top-{traces.top_k}; routing: "
            f"{a.traces[i] if a.traces else 'synthetic'}")
        if a.prediction:
            env[f"prediction_{shape}"] = prediction_precision(traces, a.new_tokens, a.eamc_capacity)
            log(f"  next-layer top-k precision (no cache): {json.dumps(env[f'prediction_{shape}'])}")
            save(results)
            continue
        done = list(results)
        results = done + host_time(argparse.Namespace(**{**vars(a), "shape": shape}), traces, log,
                                   save=lambda rs: save(done + rs))
        save(results)
    if a.plot_prefix and results:
        log("plot: " + plot_decisions(results, f"{a.plot_prefix}_decisions.png"))
        log("plot: " + plot_copies(results, f"{a.plot_prefix}_copies.png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", choices=["dsv2lite", "qwen3"])
    p.add_argument("--traces", action="append", help="trace file per --shape, same order")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--small", action="store_true", help="tiny hidden sizes: develop the harness on a CPU")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--budgets-bn", type=int, nargs="+", default=None, help="budgets at batch > 1 (default: --budgets)")
    p.add_argument("--warmup-tokens", type=int, default=None, help="decode steps of warm-up groups (default: all)")
    p.add_argument("--policies", nargs="+", default=["resident", *POLICIES, "accelerate"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="groups run first and not counted")
    p.add_argument("--groups-b1", type=int, default=3, help="measured requests at batch 1")
    p.add_argument("--groups-bn", type=int, default=1, help="measured batches at batch > 1")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the policies this many times, every other round in reverse order, and report each "
                        "policy's median round (the first configuration a process times can run slow)")
    p.add_argument("--eamc-capacity", type=int, default=120)
    p.add_argument("--prefetch-window-mib", type=float, default=None,
                   help="prefetch copies in flight at most, MiB (default: the offloader's PREFETCH_WINDOW_BYTES)")
    p.add_argument("--gather-max-mib", type=float, default=None,
                   help="largest compact bank the offloader gathers, MiB (default: the offloader's GATHER_MAX_BYTES or "
                   "GATHER_POOL_SHARE of the cache, whichever is more)")
    p.add_argument("--host-layers", type=int, default=8, help="distinct pinned host layers (0: one per layer)")
    p.add_argument("--accelerate-layers", type=int, default=4)
    p.add_argument("--accelerate-budgets", type=int, nargs="+", default=[25])
    p.add_argument("--accelerate-tokens", type=int, default=8)
    p.add_argument("--out", default="runs/bench_offload.json")
    p.add_argument("--plot-prefix", default=None, help="e.g. docs/figures/offload (--host-time: "
                   "<prefix>_decisions.png, hit rates per policy, and <prefix>_copies.png, experts copied per "
                   "decode step and per prefill beside MIN's)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge result files (later ones add to earlier), "
                   "recompute bounds and ratios, write --out, print the table, plot; no benchmark is run")
    p.add_argument("--host-time", action="store_true",
                   help="measure the offloader's host time per decode step: the real layer x expert x top-k counts "
                   "with tiny widths, the offloader driven layer by layer without the model (runs on a CPU in "
                   "seconds); without --traces the routing is synthetic (SyntheticTraces)")
    p.add_argument("--compute", choices=["real", "compact", "none"], default="real",
                   help="--host-time: the expert arithmetic. real (default): as the offloader does it; compact: the "
                   "same kernels on a bank of only the slots used, even where the offloader would not gather (a "
                   "CPU's grouped_mm costs ~1 us per slot of the bank, used or not; a GPU's launch does not); none: "
                   "a zero output (the bookkeeping alone)")
    p.add_argument("--arrival-gap", type=int, default=0, metavar="STEPS",
                   help="batch > 1: continuous batching -- a batch's requests join one by one, every STEPS decode "
                   "steps, each prefilled alone between the others' decode steps and merged into the running KV "
                   "cache (as the serving engine runs them), and leave after --new-tokens; TPOT is then the mean "
                   "decode step at whatever batch it ran; 0 (default): the batch prefills together and decodes in "
                   "lockstep. With or without --host-time")
    p.add_argument("--shift", metavar="A,B", default=None,
                   help="--host-time: the request mix shifts -- --warmup groups drawn from trace category A (python, "
                   "doc, man), then the measured groups from B")
    p.add_argument("--frequency-half-life", type=float, default=None, metavar="FORWARDS",
                   help="--host-time: expert_eviction_frequency_half_life of the activation-aware policies "
                   "(default: the serving default; 0: never forget)")
    p.add_argument("--prediction", action="store_true", help="--host-time: instead, report how well the next "
                   "layer's experts are predicted by the EAMC, by popularity and by the request's own decode so far")
    a = p.parse_args(argv)
    if a.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {a.rounds}")
    if a.merge:
        return merge(a.merge, a.out, a.plot_prefix)
    if a.host_time:
        return main_host_time(a, argv)
    if a.shift or a.frequency_half_life is not None:
        raise SystemExit("--shift and --frequency-half-life apply to --host-time only")
    if not a.shape or len(a.shape) != len(a.traces or []):
        raise SystemExit("give one --traces per --shape")
    device = torch.device(a.device)
    if a.gather_max_mib is not None:
        offloader_module.GATHER_MAX_BYTES = int(a.gather_max_mib * 2**20)
        offloader_module.GATHER_POOL_SHARE = 0
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    env = {"command": "python -m tritonmoe.tools.bench_offload " + " ".join(argv if argv is not None else
                                                                           __import__("sys").argv[1:]),
           "date": started, "host": platform.node(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    import transformers

    env["transformers"] = transformers.__version__
    env["gather_max_bytes"] = offloader_module.GATHER_MAX_BYTES
    env["gather_pool_share"] = offloader_module.GATHER_POOL_SHARE
    env["prefetch_window_bytes"] = (offloader_module.PREFETCH_WINDOW_BYTES if a.prefetch_window_mib is None
                                    else int(a.prefetch_window_mib * 2**20))
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(json.dumps(env))
    env["h2d"] = measure_h2d(device)
    log(f"H2D: {env['h2d']}")
    results = []
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def save(rs):  # after every configuration: a failure or a timeout later keeps what was measured
        h2d = env["h2d"]["pinned_GBps"]
        add_bounds(rs, h2d if h2d == h2d else 1.0)
        with open(a.out, "w") as f:
            json.dump({"env": env, "results": rs}, f, indent=1)

    for shape, path in zip(a.shape, a.traces):
        args = argparse.Namespace(**{**vars(a), "shape": shape})
        traces = Traces(path)
        env[f"traces_{shape}"] = {"path": path, **{k: traces.meta[k] for k in ("train_steps", "train_seconds",
                                                                              "device", "tokens_seen")
                                                  if k in traces.meta}, "final_lm_loss": traces.meta["curve"][-1][2]}
        done = list(results)
        results = done + bench_shape(args, traces, device, log, save=lambda rs: save(done + rs))
        save(results)
    log(table(results))
    if a.plot_prefix:
        log("plots: " + ", ".join(plot(results, a.plot_prefix)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
