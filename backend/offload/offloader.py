"""The offloader: what the serving engine holds, and what every MoE layer's experts call into.

    model, offloader = load_offloaded_model(path, device, dtype, OffloadConfig.from_parameters(params))
    offloader.begin_forward(["req-1"], "prefill"); model(...)          # one request's prompt
    offloader.begin_forward(["req-1", "req-2"], "decode"); model(...)  # B requests x 1 token
    offloader.end_sequence("req-1")                                    # its EAM joins the EAMC
    offloader.stats(); offloader.close()

Per MoE layer (``run_experts``): read the routing once to the CPU (what to fetch depends on it), add each sequence's
counts to its EAM, refresh the prediction, let the prefetch policy replace the prefetch queue, then make the batch's
union of experts resident -- hits first, missing ones fetched on demand ahead of any prefetch -- and compute. A
layer needing more experts than the cache has slots runs in rounds of at most ``num_slots`` experts.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .cache import ExpertCache
from .config import ACTIVATION_EVICTION, OffloadConfig
from .copy_engine import make_copy_engine
from .eam import PHASES, ActivationPredictor, ActivationTracer, EAMCollection
from .eviction import BatchAwareEviction, make_eviction_policy
from .experts_forward import (EXPERTS_IMPLEMENTATION, HANDLE_ATTR, register_experts_implementation,
                              weighted_pair_outputs)
from .host_store import HostExpertStore
from .layout import ExpertLayout
from .prefetch import (ActivationPrefetch, LookaheadRefinedPrediction, NoPrefetch, PrefetchQueue,
                       RouterLookaheadPrefetch)
from .stats import OffloadStats

# Prefetch copies issued ahead of need: enough to keep the copy engine busy between two MoE layers (~1 ms of
# PCIe Gen5), few enough that a demand fetch waits behind little.
PREFETCH_WINDOW_BYTES = 64 * 2**20
# torch's CUDA grouped_mm checks group_count < 1024 ("Can't process more than 1024 groups"): the slot bank a
# computation sees spans at most this many slots, and a round whose slots span more runs one bank per block.
MAX_GROUPS = 1023
# A round whose slots lie far apart (a bank much wider than the experts used; always once a cache holds more than
# ~1,000 experts and a layer's experts sit across it) may read its experts through a compact copy of just those
# slots, made on the device by one gather, so the kernels see one group per expert used and one grouped_mm call.
# The gather moves every byte of those experts twice, so it pays only where the alternative costs more: on a CPU,
# whose grouped_mm costs ~1 us per group, used or not, whenever the bank is wider than both GATHER_MIN_BANK slots
# and GATHER_FACTOR x the experts used; on CUDA, where empty groups cost nothing measurable, only instead of
# splitting into blocks of MAX_GROUPS slots (each block another pass through the expert forward's ~dozen launches;
# H200, Qwen3-30B-A3B shapes at 25%, batch 8: 264 vs 285 ms per token; gathering where one bank would do gained
# nothing on DeepSeek-V2-Lite shapes, 218 vs 210 ms across runs). The copy is transient device memory beside the
# cache: at most GATHER_MAX_BYTES or GATHER_POOL_SHARE of the cache pool, whichever is more.
GATHER_MAX_BYTES = 256 * 2**20
GATHER_POOL_SHARE = 1 / 8
GATHER_MIN_BANK = 64
GATHER_FACTOR = 4


class Offloader:
    def __init__(self, config: OffloadConfig, store: HostExpertStore, device: torch.device,
                 routers: list[torch.nn.Module]):
        self.config = config
        self.device = device
        self.store = store
        num_layers, num_experts = store.num_layers, store.num_experts
        self.num_slots = config.budget.slots(store.layout.slot_bytes, num_layers * num_experts)
        self.tracer = ActivationTracer(num_layers, num_experts)
        self.eamc = (EAMCollection.load(config.eamc_path, config.eamc_capacity, num_layers, num_experts)
                     if config.eamc_path else EAMCollection(config.eamc_capacity, num_layers, num_experts))
        self.predictor = (ActivationPredictor(self.eamc, config.eamc_top_matches)
                          if config.uses_activation_prediction else None)
        # activation-aware eviction beside the lookahead prefetch: the lookahead's picks refine what eviction reads
        self.refined = (LookaheadRefinedPrediction(self.predictor)
                        if config.eviction in ACTIVATION_EVICTION and config.prefetch == "lookahead" else None)
        self._stats = OffloadStats(num_layers)
        engine = make_copy_engine(device, self.num_slots, self._stats)
        eviction = make_eviction_policy(config.eviction, self.refined or self.predictor, config.eviction_depth_factor,
                                        config.eviction_frequency_weight, config.eviction_frequency_half_life)
        self.cache = ExpertCache(store, self.num_slots, device, eviction, engine, self._stats)
        window = max(2, PREFETCH_WINDOW_BYTES // store.layout.slot_bytes)
        # a layer issues at most ~2 windows (one pump per round, one at its end) before the next replans
        limit = min(self.num_slots, 4 * window)
        if config.prefetch == "activation":
            self.prefetch_policy = ActivationPrefetch(self.predictor, self.cache.resident_mask, limit=limit)
        elif config.prefetch == "lookahead":
            self.prefetch_policy = RouterLookaheadPrefetch(routers, num_experts, self.refined)
        else:
            self.prefetch_policy = NoPrefetch()
        self.prefetch_queue = PrefetchQueue(self.cache, window)
        if config.prefetch != "none":  # a round's prefetches take the victims after its demand ones
            self.cache.victim_lookahead = window
        self._row_groups = 1  # sequences in the current forward (1 until begin_forward says otherwise)
        self._observe = self.predictor is not None  # whether run_experts refreshes the prediction
        self._resumed: list[int] | None = None  # per sequence, its last rows that are resumed tokens (a prefill)
        self._expert_dtype = self.cache.views[store.layout.names[0]].dtype
        self._slot_of = np.zeros(num_experts, dtype=np.int64)  # scratch: expert -> slot of the current round
        self._gather_max_bytes = max(GATHER_MAX_BYTES,
                                     int(GATHER_POOL_SHARE * self.num_slots * store.layout.slot_bytes))

    def set_prefetch_window(self, window: int) -> None:
        """Prefetches in flight at most (default: ``PREFETCH_WINDOW_BYTES`` of experts, at least 2), and the plan's
        head kept by the activation policy (4 windows). Benchmarks of tiny-width models set the window the
        full-size experts would get."""
        self.prefetch_queue._window = max(1, int(window))
        if self.cache.victim_lookahead:
            self.cache.victim_lookahead = self.prefetch_queue._window
        if isinstance(self.prefetch_policy, ActivationPrefetch):
            self.prefetch_policy._limit = min(self.num_slots, 4 * self.prefetch_queue._window)

    def set_lookahead_routers(self, routers: list) -> None:
        """The routers a lookahead prefetch applies (``routers[i]``: MoE layer ``i``'s); benchmarks replaying
        recorded routing put replays of the lookahead's picks here."""
        if not isinstance(self.prefetch_policy, RouterLookaheadPrefetch):
            raise ValueError(f"prefetch policy {self.config.prefetch!r} applies no routers")
        self.prefetch_policy.routers = list(routers)

    # ---- the engine's interface -------------------------------------------------------------------------------
    def begin_forward(self, seq_ids: list[str], phase: str, resumed: list[int] | None = None) -> None:
        """Before each model forward: row ``r`` of it belongs to ``seq_ids[r // (rows / len(seq_ids))]``.

        ``resumed`` (a prefill only): per sequence, how many of its last rows are output tokens resumed from another
        server (live migration). They were decode steps there, so their routing counts into the decode EAM, which
        then equals the source's and drives the prediction from the first decode step."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if not seq_ids:
            raise ValueError("begin_forward needs at least one sequence id")
        if resumed is not None and (phase != "prefill" or len(resumed) != len(seq_ids) or min(resumed) < 0):
            raise ValueError("resumed: a prefill's count of resumed tokens (>= 0) per sequence")
        self._row_groups = len(seq_ids)
        self._resumed = list(resumed) if resumed is not None and any(resumed) else None
        eams = self.tracer.begin_forward(list(seq_ids), phase, resumed=self._resumed is not None)
        if self.predictor is not None:
            self.predictor.begin_forward(eams, phase)
        if self.refined is not None:
            self.refined.begin_forward()
        eviction = self.cache.eviction
        if isinstance(eviction, BatchAwareEviction):
            eviction.set_forward(len(seq_ids), phase)
            # a lone decode step: eviction is LRU, and nothing else reads the prediction unless the prefetch does
            self._observe = self.predictor is not None and (not eviction.single or self.config.prefetch == "activation")

    def end_sequence(self, seq_id: str) -> None:
        """A request finished or was cancelled: its EAM joins the EAMC."""
        eam = self.tracer.finish(seq_id)
        if eam is not None:
            self.eamc.add(eam)

    def stats(self) -> dict:
        self.cache.engine.collect()
        out = self._stats.as_dict()
        out.update(num_slots=self.num_slots, slot_bytes=self.store.layout.slot_bytes,
                   cache_bytes=self.num_slots * self.store.layout.slot_bytes, host_bytes=self.store.total_bytes,
                   eviction=self.config.eviction, prefetch=self.config.prefetch, eamc_entries=len(self.eamc))
        return out

    def close(self) -> None:
        """Finish copies in flight and free copy streams; save the EAMC when ``eamc_path`` is set."""
        self.cache.engine.close()
        if self.config.eamc_path:
            self.eamc.save(self.config.eamc_path)

    # ---- called by every MoE layer ------------------------------------------------------------------------------
    def run_experts(self, layer: int, module: torch.nn.Module, hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        # the one host sync per layer (what to fetch depends on it), which also brings back what the prefetch
        # policy queued on the device for its plan (the lookahead's picks)
        launched = self.prefetch_policy.launch(layer, hidden_states)
        routing, launched = _read_back(top_k_index, launched)
        host_start = time.perf_counter()
        counts = self._counts_per_sequence(routing)
        self.tracer.record(layer, counts, None if self._resumed is None else self._resumed_counts(routing))
        if self._observe:
            self.predictor.observe(layer)
        self.prefetch_queue.replace(self.prefetch_policy.plan(layer, hidden_states, launched))

        needed = np.flatnonzero(counts[0] if len(counts) == 1 else counts.sum(axis=0))
        # resident experts first: they fill the first round and are never evicted by a later round's fetches
        resident = self.cache.resident_mask[layer, needed]
        if not resident.all():
            needed = np.concatenate([needed[resident], needed[~resident]])
        out_dtype = torch.promote_types(self._expert_dtype, top_k_weights.dtype)
        pair_inputs = hidden_states.to(out_dtype).repeat_interleave(top_k, dim=0)  # (token, k) pairs, stock order
        pair_weights = top_k_weights.reshape(-1)
        pair_experts = routing.reshape(-1)
        if len(needed) <= self.num_slots:
            pair_out = self._run_round(layer, module, needed, pair_experts, None, pair_inputs, pair_weights)
        else:
            pair_out = torch.empty_like(pair_inputs)
            for start in range(0, len(needed), self.num_slots):
                group = needed[start:start + self.num_slots]
                rows = np.flatnonzero(np.isin(pair_experts, group))
                rows_t = _upload(rows, hidden_states.device)
                pair_out[rows_t] = self._run_round(layer, module, group, pair_experts[rows], rows_t,
                                                   pair_inputs, pair_weights)
        self.prefetch_queue.pump()
        # the stock reduction: sum over k per token in the promoted dtype, then cast back
        out = pair_out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)
        self._stats.host_s[layer] += time.perf_counter() - host_start
        return out

    def _run_round(self, layer, module, experts, pair_experts, rows, pair_inputs, pair_weights) -> torch.Tensor:
        slots = self.cache.acquire(layer, experts)
        self.prefetch_queue.pump()  # prefetches go out behind this round's demand fetches
        slot_list = slots.tolist()
        self.cache.engine.wait_ready(slot_list, layer)
        slot_of = self._slot_of  # expert -> slot for this round (only this round's experts are read)
        slot_of[experts] = slots
        pair_slots = slot_of[pair_experts]
        if rows is not None:
            pair_inputs, pair_weights = pair_inputs[rows], pair_weights[rows]
        lo, hi = int(slots.min()), int(slots.max())
        device = pair_inputs.device
        n = len(slots)
        plan = bank_plan(hi - lo + 1, n, n * self.store.layout.slot_bytes, self._gather_max_bytes,
                         empty_groups_cost=device.type != "cuda")
        if plan == "gather":
            # compact bank: group i = the round's expert i; one upload carries the slots and the pairs' groups
            slot_of[experts] = np.arange(n)
            both = _upload(np.concatenate([slots, slot_of[pair_experts]]), device)
            # gathered as 8-byte words where the slot size allows: a uint8 gather moves one byte per element
            words = torch.index_select(self.cache.pool_words, 0, both[:n])
            bank = self.store.layout.views(words.view(torch.uint8))
            out = weighted_pair_outputs(module, bank, pair_inputs, both[n:], pair_weights, used_slots=n)
        elif plan == "bank":  # slots lo..hi
            out = weighted_pair_outputs(module, self.cache.views, pair_inputs,
                                        _upload(pair_slots - lo, device), pair_weights,
                                        first_slot=lo, used_slots=hi - lo + 1)
        else:  # a bank per block of MAX_GROUPS slots; each pair's output is its own row, so they just scatter
            out = torch.empty_like(pair_inputs)
            blocks = pair_slots // MAX_GROUPS
            for block in np.unique(blocks):
                sel = np.flatnonzero(blocks == block)
                sel_t = _upload(sel, device)
                b_slots = pair_slots[sel]
                b_lo = int(b_slots.min())
                out[sel_t] = weighted_pair_outputs(module, self.cache.views, pair_inputs[sel_t],
                                                   _upload(b_slots - b_lo, device),
                                                   pair_weights[sel_t], first_slot=b_lo,
                                                   used_slots=int(b_slots.max()) - b_lo + 1)
        self.cache.engine.release(slot_list, layer)
        self.cache.release()
        return out

    def _counts_per_sequence(self, routing: np.ndarray) -> np.ndarray:
        """``[row_groups, E]``: tokens routed to each expert, per sequence of the forward."""
        groups, experts = self._row_groups, self.store.num_experts
        if groups == 1:
            return np.bincount(routing.ravel(), minlength=experts)[None]
        if routing.shape[0] % groups:
            raise ValueError(f"{routing.shape[0]} rows do not split evenly over the {groups} sequences given to "
                             "begin_forward")
        ids = routing.reshape(groups, -1) + (np.arange(groups) * experts)[:, None]
        return np.bincount(ids.ravel(), minlength=groups * experts).reshape(groups, experts)

    def _resumed_counts(self, routing: np.ndarray) -> np.ndarray:
        """``[row_groups, E]``: like :meth:`_counts_per_sequence`, over each sequence's last ``resumed`` rows."""
        rows = routing.shape[0] // self._row_groups
        if max(self._resumed) > rows:
            raise ValueError(f"{max(self._resumed)} resumed tokens do not fit a sequence's {rows} rows")
        return np.stack([np.bincount(routing[(i + 1) * rows - n:(i + 1) * rows].ravel(),
                                     minlength=self.store.num_experts) for i, n in enumerate(self._resumed)])


def bank_plan(span: int, used: int, used_bytes: int, gather_max_bytes: int, empty_groups_cost: bool) -> str:
    """How a round computes on ``used`` experts whose slots span ``span`` slots (``used_bytes`` in all):
    ``"gather"`` (a compact copy of just those slots), ``"bank"`` (the slots in between as they are) or
    ``"blocks"`` (one bank per block of ``MAX_GROUPS`` slots). See ``GATHER_MAX_BYTES``."""
    fits_one = span <= MAX_GROUPS
    sparse = span > max(GATHER_MIN_BANK, GATHER_FACTOR * used)
    if sparse and used_bytes <= gather_max_bytes and (empty_groups_cost or not fits_one):
        return "gather"
    return "bank" if fits_one else "blocks"


def _read_back(routing: torch.Tensor, launched: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``routing`` (and ``launched``, when given) on the host, with one device-to-host read where they share a
    device."""
    if launched is None:
        return routing.cpu().numpy(), None
    if launched.device != routing.device:
        return routing.cpu().numpy(), launched.cpu().numpy()
    flat = routing.reshape(-1)
    both = torch.cat([flat, launched.to(flat.dtype)]).cpu().numpy()
    return both[:flat.numel()].reshape(routing.shape), both[flat.numel():]


def _upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host indices to the compute device without blocking the CPU. A plain ``torch.as_tensor(..., device=cuda)``
    copies from pageable memory, which waits for the compute stream to drain -- including its waits on this
    layer's expert copies -- so the CPU would sit idle through every transfer instead of issuing the next work
    (seen on the H100: offloader host time per token 122-257 ms for Qwen3-30B-A3B shapes, GPU-timed stalls
    0.5-46 ms). Pinned memory from PyTorch's caching host allocator is kept until the copy has run."""
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _is_experts_module(module: torch.nn.Module) -> bool:
    """Modules decorated by transformers' ``use_experts_implementation`` (fused 3-D expert weights)."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "num_experts")


def attach_offloading(model: torch.nn.Module, config: OffloadConfig, device: str | torch.device | None = None,
                      host_store: HostExpertStore | None = None) -> Offloader:
    """Move ``model``'s routed experts to the host tier and serve them through a device expert cache.

    ``device``: the compute device (default: where the input embeddings are). Non-expert weights are moved
    there; expert parameters are replaced by empty placeholders, so the device holds no expert outside the cache.
    ``host_store``: expert buffers supplied by a loader; when given, the model's expert parameters are not read
    (they may be on the meta device)."""
    register_experts_implementation()
    named = [(name, m) for name, m in model.named_modules() if _is_experts_module(m)]
    if not named:
        raise ValueError(f"{type(model).__name__} has no experts modules that transformers' ExpertsInterface runs")
    modules = [m for _, m in named]
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    layout = ExpertLayout.of_experts_module(modules[0])

    def drop_expert_params(module: torch.nn.Module) -> None:
        for t in layout.tensors:
            setattr(module, t.name, torch.nn.Parameter(torch.empty(0, dtype=t.dtype, device=device),
                                                       requires_grad=False))

    if host_store is None:
        pin = config.pin_host_memory and device.type == "cuda"
        host_store = HostExpertStore.from_experts_modules(modules, pin=pin, after_pack=drop_expert_params)
    else:
        if host_store.layout != layout or (host_store.num_layers, host_store.num_experts) != (
                len(modules), modules[0].num_experts):
            raise ValueError("the host store does not match this model's experts")
        for m in modules:
            drop_expert_params(m)
    model.to(device)

    blocks = [model.get_submodule(name.rpartition(".")[0]) for name, _ in named]
    routers = [getattr(b, "gate", None) or getattr(b, "router", None) for b in blocks]  # GPT-OSS: `.router`
    if config.prefetch == "lookahead" and any(r is None for r in routers):
        raise ValueError("router-lookahead prefetching (expert_prefetch: lookahead, the default) needs each MoE "
                         f"block's router at `.gate` or `.router`, which {type(model).__name__} does not have; set "
                         "expert_prefetch to 'activation' or 'none'")
    offloader = Offloader(config, host_store, device, routers)
    for i, m in enumerate(modules):
        setattr(m, HANDLE_ATTR, (offloader, i))
    if model.config._experts_implementation != EXPERTS_IMPLEMENTATION:
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return offloader


def load_offloaded_model(path: str | os.PathLike, device: str | torch.device, dtype: torch.dtype | str,
                         config: OffloadConfig) -> tuple[torch.nn.Module, Offloader]:
    """Load a Hugging Face checkpoint on the host, offload its experts, and put the rest on ``device``."""
    from transformers import AutoModelForCausalLM

    register_experts_implementation()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
    model.eval()
    return model, attach_offloading(model, config, device=device)
