"""The ``tritonmoe_offload`` experts implementation for transformers' ``ExpertsInterface``.

transformers calls ``fn(self, hidden_states, top_k_index, top_k_weights)`` for every MoE layer's experts module
once a model runs with ``experts_implementation="tritonmoe_offload"``. The module carries a handle to the
offloader (set by ``attach_offloading``), which makes the experts resident and calls :func:`weighted_pair_outputs`.

The arithmetic is transformers' own ``grouped_mm`` implementation (the default one), run on the cache pool: it sees
the experts module with its fused weights replaced by views of the first ``n`` cache slots, and slot ids in place of
expert ids. Each (token, k) pair is computed as a token of its own with top-1 routing and returned before the
per-token sum and the final cast, so the offloader can sum the pairs exactly as the stock code does, in the same
order, even when a layer's experts arrive over several rounds.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

EXPERTS_IMPLEMENTATION = "tritonmoe_offload"
HANDLE_ATTR = "_tritonmoe_offload"  # on each experts module: (offloader, moe_layer_index)


def offloaded_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    handle = getattr(self, HANDLE_ATTR, None)
    if handle is None:
        raise RuntimeError(f"{type(self).__name__} runs experts_implementation={EXPERTS_IMPLEMENTATION!r} but its "
                           "experts are not offloaded: call attach_offloading(model, config) first")
    offloader, layer = handle
    return offloader.run_experts(layer, self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Make ``experts_implementation="tritonmoe_offload"`` known to transformers (idempotent)."""
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, offloaded_experts_forward)


class _SlotBank:
    """What the stock forward sees as ``self``: the experts module (activation, gate, flags) whose expert weights
    are cache slots ``first .. first + n - 1``, so that "expert id" means "slot id - first"."""

    def __init__(self, module: torch.nn.Module, slot_views: dict[str, torch.Tensor], n: int, first: int = 0):
        self._module = module
        for name, view in slot_views.items():
            setattr(self, name, view[first:first + n])  # fewer groups for grouped_mm to walk than the whole pool
        self.num_experts = n
        self._is_expert_parallel = False

    def __getattr__(self, name):
        return getattr(self._module, name)


def weighted_pair_outputs(module: torch.nn.Module, slot_views: dict[str, torch.Tensor], pair_inputs: torch.Tensor,
                          pair_slots: torch.Tensor, pair_weights: torch.Tensor, used_slots: int,
                          first_slot: int = 0) -> torch.Tensor:
    """``expert(x) * weight`` for each (token, k) pair: ``pair_inputs [S, H]`` already in the output dtype (the
    promotion of expert and routing-weight dtypes, as stock), ``pair_slots``/``pair_weights`` ``[S]``;
    ``pair_slots`` count from ``first_slot``, and the bank is ``used_slots`` slots wide."""
    grouped_mm = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    bank = _SlotBank(module, slot_views, used_slots, first_slot)
    return grouped_mm(bank, pair_inputs, pair_slots[:, None], pair_weights[:, None])
