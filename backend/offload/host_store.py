"""The host tier: every routed expert's bytes, off the compute device.

:class:`HostExpertStore` is the packed tier: per MoE layer one contiguous uint8 buffer ``[num_experts, slot_bytes]``
in transformers' fused layout (:class:`~.layout.ExpertLayout`), so an expert moves into a cache slot with one copy.
It is built from a loaded model's expert parameters (:meth:`HostExpertStore.from_experts_modules`).

:class:`PartsHostStore` is the zero-copy tier over memory someone else holds (the loader's shared-memory DRAM copy
of a converted checkpoint): expert ``e`` of layer ``l`` is a short list of *parts*, each a uint8 view of the source
memory and the byte offset in the slot where it lands (Mixtral: ``w1`` -> ``gate_up_proj`` rows ``[0:F]``, ``w3``
-> rows ``[F:2F]``, ``w2`` -> ``down_proj``), so a fetch is a few copies into one slot instead of one, and the host
holds no second copy of the experts.

Both offer what the cache and the copy engines read: ``layout``, ``num_layers``, ``num_experts``, ``pinned``,
``total_bytes``, ``multipart`` and ``parts(layer, expert)``; the packed store also ``buffer(layer, expert)``, the
parts store ``will_need(layers, experts)`` (a no-op unless its parts view files on disk, see ``file_backed``).
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

import numpy as np
import torch

from .layout import ExpertLayout

# (source, offset): ``source`` a 1-D contiguous uint8 CPU tensor, copied to bytes [offset, offset + numel) of a slot
Part = tuple[torch.Tensor, int]


class HostExpertStore:
    """Per MoE layer, a uint8 tensor ``[num_experts, layout.slot_bytes]`` in host memory (pinned for fast DMA)."""

    multipart = False  # one contiguous buffer per expert: one copy per fetch

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

    def parts(self, layer: int, expert: int) -> list[Part]:
        return [(self._layers[layer][expert], 0)]

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


class PartsHostStore:
    """Experts as lists of parts viewing memory held elsewhere (no copy here). ``parts[layer][expert]`` is a list
    of ``(uint8 source view, slot offset)``; together they must fill every tensor of the layout exactly (padding
    between tensors is left as it is in the slot: nothing reads it). ``pinned``: whether the source memory is
    page-locked (CUDA copies from it are then asynchronous). ``keepalive``: the object owning the memory (e.g. the
    loader's :class:`~tritonmoe.loader.client.ShmCheckpoint`), referenced for as long as the store lives."""

    multipart = True

    def __init__(self, layout: ExpertLayout, parts: list[list[list[Part]]], pinned: bool = False,
                 keepalive: object = None, file_backed: bool = False):
        if not parts or not parts[0]:
            raise ValueError("a host store needs at least one MoE layer with at least one expert")
        experts = len(parts[0])
        spans = [(t.offset, t.offset + t.nbytes) for t in layout.tensors]
        for layer, layer_parts in enumerate(parts):
            if len(layer_parts) != experts:
                raise ValueError(f"layer {layer} has {len(layer_parts)} experts, layer 0 has {experts}")
            for expert, expert_parts in enumerate(layer_parts):
                covered = []
                for src, offset in expert_parts:
                    if src.dtype != torch.uint8 or src.dim() != 1 or src.device.type != "cpu" \
                            or not src.is_contiguous():
                        raise ValueError(f"layer {layer} expert {expert}: a part must be a 1-D contiguous CPU uint8 "
                                         f"tensor, got {src.dtype} {tuple(src.shape)} on {src.device}")
                    covered.append((offset, offset + src.numel()))
                if _merge(covered) != _merge(spans):
                    raise ValueError(f"layer {layer} expert {expert}: parts cover bytes {_merge(covered)} of the "
                                     f"slot, the layout's tensors are {_merge(spans)}")
                if sum(e - s for s, e in covered) != sum(e - s for s, e in _merge(covered)):
                    raise ValueError(f"layer {layer} expert {expert}: parts overlap")
        self.layout = layout
        self._parts = parts
        self.num_layers = len(parts)
        self.num_experts = experts
        self._pinned = pinned
        self.keepalive = keepalive
        # The parts view a memory map of files on disk (the disk tier): the kernel's readahead on page faults is
        # turned off over them -- faulting an expert in read ~2.6x its bytes, the neighbours' included -- and a
        # batch of misses asks for exactly its experts' bytes at once instead (will_need: reads in flight together)
        self.file_backed = file_backed
        if file_backed:
            for layer_parts in parts:
                for expert_parts in layer_parts:
                    for src, _ in expert_parts:
                        _advise(src, mmap.MADV_RANDOM)

    def parts(self, layer: int, expert: int) -> list[Part]:
        return self._parts[layer][expert]

    def will_need(self, layers, experts: np.ndarray) -> np.ndarray | None:
        """About to copy expert ``experts[i]`` of MoE layer ``layers`` (an int) or ``layers[i]``: on a file-backed
        store, start reading all their bytes from disk now (``MADV_WILLNEED``) and return, per expert, how many of
        its bytes were not in the page cache (``mincore``: what the disk has to supply); otherwise None."""
        if not self.file_backed:
            return None
        per_expert = np.ndim(layers) > 0
        missing = np.zeros(len(experts), dtype=np.int64)
        for i, expert in enumerate(experts.tolist()):
            for src, _ in self._parts[int(layers[i]) if per_expert else layers][expert]:
                absent = _bytes_not_cached(src)
                if absent:  # all cached (the usual warm case): nothing to ask for
                    missing[i] += absent
                    _advise(src, mmap.MADV_WILLNEED)
        return missing

    def gather(self, layer: int, expert: int) -> torch.Tensor:
        """A packed copy of one expert (uint8 ``[slot_bytes]``, padding zero): for checks, not for serving."""
        out = torch.zeros(self.layout.slot_bytes, dtype=torch.uint8)
        for src, offset in self._parts[layer][expert]:
            out[offset:offset + src.numel()].copy_(src)
        return out

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def total_bytes(self) -> int:
        """Bytes of expert slots this tier serves (held by the source memory, not by this process)."""
        return self.num_layers * self.num_experts * self.layout.slot_bytes

    @property
    def num_parts(self) -> int:
        return sum(len(p) for layer in self._parts for p in layer)

    @classmethod
    def from_sources(cls, layout: ExpertLayout, sources: list[list[list[tuple[str, int, torch.Tensor]]]],
                     pinned: bool = False, keepalive: object = None,
                     split_grid: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                     file_backed: bool = False) -> "PartsHostStore":
        """From ``sources[layer][expert]``: ``(parameter name, byte offset in that parameter's per-expert slice,
        uint8 view)`` triples, as :func:`tritonmoe.loader.hf_model.expert_sources` gives them. Parts adjacent in
        both the source memory and the slot are merged into one copy (e.g. Qwen's ``gate_proj`` and ``up_proj``,
        stored back to back, fill ``gate_up_proj`` with one). ``split_grid(view)``: splits a part where a copy
        must not cross (the page-locked registration grid on CUDA)."""
        offset_of = {t.name: t.offset for t in layout.tensors}
        parts = []
        for layer, layer_sources in enumerate(sources):
            layer_parts = []
            for expert, expert_sources in enumerate(layer_sources):
                unknown = {name for name, _, _ in expert_sources} - set(offset_of)
                if unknown:
                    raise ValueError(f"layer {layer} expert {expert}: {sorted(unknown)} are not in the expert layout "
                                     f"{layout.names}")
                placed = sorted(((offset_of[name] + off, view) for name, off, view in expert_sources),
                                key=lambda p: p[0])
                merged: list[Part] = []
                for dst, view in placed:
                    if merged:
                        prev, prev_dst = merged[-1]
                        if prev_dst + prev.numel() == dst and prev.numel() and view.numel() and \
                                prev.data_ptr() + prev.numel() == view.data_ptr() and \
                                prev.untyped_storage().data_ptr() == view.untyped_storage().data_ptr():
                            merged[-1] = (prev.as_strided((prev.numel() + view.numel(),), (1,)), prev_dst)
                            continue
                    merged.append((view, dst))
                if split_grid is not None:
                    split = []
                    for view, dst in merged:
                        for piece in split_grid(view):
                            split.append((piece, dst + piece.data_ptr() - view.data_ptr()))
                    merged = split
                layer_parts.append(merged)
            parts.append(layer_parts)
        return cls(layout, parts, pinned=pinned, keepalive=keepalive, file_backed=file_backed)


_PAGE = mmap.PAGESIZE
_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return _libc


def _pages(view: torch.Tensor) -> tuple[int, int]:
    start = view.data_ptr() // _PAGE * _PAGE
    return start, view.data_ptr() + view.numel() - start


def _advise(view: torch.Tensor, advice: int) -> None:
    """``madvise`` over the pages a view of a memory map covers (advice only: a refusal changes nothing but speed)."""
    _lib().madvise(*_pages(view), advice)


def _bytes_not_cached(view: torch.Tensor) -> int:
    """Bytes of the pages a view of a file mapping covers that are not in the page cache (``mincore``; 0 where the
    kernel will not say)."""
    start, length = _pages(view)
    vec = np.empty((length + _PAGE - 1) // _PAGE, dtype=np.uint8)
    if _lib().mincore(start, length, vec.ctypes.data) != 0:
        return 0
    return min(int((vec & 1 == 0).sum()) * _PAGE, view.numel())


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if s == e:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
