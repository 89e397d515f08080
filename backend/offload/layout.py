"""Byte layout of one routed expert: all of its tensors packed into one aligned buffer, so it moves with one copy.

transformers keeps an MoE layer's experts as fused parameters whose first dimension is the expert
(``gate_up_proj[E, 2F, H]``, ``down_proj[E, H, F]``, optional biases ``[E, ...]``). Expert ``e`` is row ``e`` of
each; the layout places those rows one after another in a byte buffer, each at an aligned offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Each tensor starts on a 256 B boundary: grouped GEMM kernels want 16 B-aligned operands and strides, and 256 B
# keeps every view on its own cache lines. A slot is padded to 4 KiB, the page size the checkpoint store uses.
TENSOR_ALIGN = 256
SLOT_ALIGN = 4096


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class ExpertTensor:
    name: str  # the experts module's parameter name, e.g. "gate_up_proj"
    shape: tuple[int, ...]  # one expert's slice, e.g. (2F, H)
    dtype: torch.dtype
    offset: int  # bytes from the start of the expert's buffer

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayout:
    tensors: tuple[ExpertTensor, ...]
    slot_bytes: int  # bytes one expert takes in a host buffer or a cache slot, padding included

    @classmethod
    def of_experts_module(cls, module: torch.nn.Module) -> "ExpertLayout":
        """The layout of ``module``'s experts: every parameter whose first dimension is ``module.num_experts``."""
        tensors, offset = [], 0
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and param.shape[0] == module.num_experts:
                t = ExpertTensor(name, tuple(param.shape[1:]), param.dtype, offset)
                tensors.append(t)
                offset = _round_up(offset + t.nbytes, TENSOR_ALIGN)
        if not tensors:
            raise ValueError(f"{type(module).__name__} has no per-expert parameters of first dimension "
                             f"{module.num_experts}")
        return cls(tuple(tensors), _round_up(offset, SLOT_ALIGN))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def views(self, buffers: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into uint8 ``buffers`` of shape ``[..., slot_bytes]``: name -> ``[..., *shape]``."""
        if buffers.dtype != torch.uint8 or buffers.shape[-1] != self.slot_bytes:
            raise ValueError(f"expected uint8 buffers of last dimension {self.slot_bytes}, got "
                             f"{buffers.dtype} {tuple(buffers.shape)}")
        return {t.name: buffers[..., t.offset:t.offset + t.nbytes].view(t.dtype).unflatten(-1, t.shape)
                for t in self.tensors}

    def pack(self, module: torch.nn.Module, out: torch.Tensor) -> None:
        """Copy every expert of ``module`` into ``out`` (uint8 ``[num_experts, slot_bytes]``)."""
        for name, view in self.views(out).items():
            view.copy_(getattr(module, name).detach())
