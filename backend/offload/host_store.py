"""The host tier: every routed expert's bytes, off the compute device, one contiguous buffer per expert.

:class:`HostExpertStore` is the interface the cache reads from. It is built here from a loaded model's expert
parameters (:meth:`HostExpertStore.from_experts_modules`); a loader that keeps a converted checkpoint in shared,
pinned memory builds it straight from its own buffers with the constructor instead, and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .layout import ExpertLayout


class HostExpertStore:
    """Per MoE layer, a uint8 tensor ``[num_experts, layout.slot_bytes]`` in host memory (pinned for fast DMA)."""

    def __init__(self, layout: ExpertLayout, layer_buffers: list[torch.Tensor]):
        if not layer_buffers:
            raise ValueError("a host store needs at least one MoE layer")
        experts = layer_buffers[0].shape[0]
        for i, buf in enumerate(layer_buffers):
            if buf.dtype != torch.uint8 or tuple(buf.shape) != (experts, layout.slot_bytes) or buf.device.type != "cpu":
                raise ValueError(f"layer {i}: expected a CPU uint8 tensor of shape {(experts, layout.slot_bytes)}, "
                                 f"got {buf.dtype} {tuple(buf.shape)} on {buf.device}")
            if not buf.is_contiguous():
                raise ValueError(f"layer {i}: host buffers must be contiguous (one expert = one copy)")
        self.layout = layout
        self._layers = layer_buffers
        self.num_layers = len(layer_buffers)
        self.num_experts = experts

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        """Expert ``expert`` of MoE layer ``layer``: uint8 ``[slot_bytes]``, contiguous."""
        return self._layers[layer][expert]

    @property
    def pinned(self) -> bool:
        return all(buf.is_pinned() for buf in self._layers)

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.layout.slot_bytes

    @classmethod
    def from_experts_modules(cls, modules: list[torch.nn.Module], pin: bool,
                             after_pack: Callable[[torch.nn.Module], None] | None = None) -> "HostExpertStore":
        """Pack each module's experts into a host buffer, layer by layer. ``after_pack(module)`` runs once a
        module is packed: freeing its parameters there keeps the extra memory to one layer's experts."""
        layout = ExpertLayout.of_experts_module(modules[0])
        buffers = []
        for i, module in enumerate(modules):
            if ExpertLayout.of_experts_module(module) != layout:
                raise ValueError(f"MoE layer {i} has a different expert layout from layer 0")
            buf = torch.empty((module.num_experts, layout.slot_bytes), dtype=torch.uint8, pin_memory=pin)
            layout.pack(module, buf)
            buffers.append(buf)
            if after_pack is not None:
                after_pack(module)
        return cls(layout, buffers)
