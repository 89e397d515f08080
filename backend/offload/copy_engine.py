"""Moving an expert from the host tier into a cache slot: one copy from a packed host buffer, or one copy per
part when the store is multi-part (``store.multipart``: experts viewed in the loader's shared memory).

Every engine offers the same calls, made by the cache and the layer computation in this order: ``bind`` (once:
the cache pool and the host tier), ``load_many`` (start filling slots: ``urgent`` for on-demand fetches, else
prefetches), ``wait_ready`` (the computation is about to read these slots), ``release`` (the computation of a
MoE layer has been issued; its slots may be overwritten once it has run), ``prefetches_in_flight``, ``collect``
(fold finished timings into the stats), ``close``.

:class:`SyncCopyEngine` is the CPU engine: plain synchronous ``copy_``. The CUDA engine lives in
``cuda_copy_engine`` and is imported only when the cache lives on a CUDA device, so nothing CUDA is loaded here.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch

from .stats import OffloadStats


class CopyEngine(Protocol):
    def bind(self, pool: torch.Tensor, store) -> None: ...

    def load_many(self, slots: np.ndarray, layers, experts: np.ndarray, urgent: bool) -> None:
        """Copy expert ``experts[i]`` of MoE layer ``layers`` (an int) or ``layers[i]`` (an array) into
        ``slots[i]``."""

    def prefetches_in_flight(self) -> int: ...

    def wait_ready(self, slots: list[int], layer: int) -> None: ...

    def release(self, slots: list[int], layer: int) -> None: ...

    def collect(self) -> None: ...

    def close(self) -> None: ...


class SyncCopyEngine:
    """Copies complete before ``load_many`` returns; the computation waits exactly for the on-demand ones."""

    def __init__(self, stats: OffloadStats):
        self._stats = stats

    def bind(self, pool: torch.Tensor, store) -> None:
        self._pool, self._store = pool, store
        self._multipart = getattr(store, "multipart", False)

    def load_many(self, slots: np.ndarray, layers, experts: np.ndarray, urgent: bool) -> None:
        start = time.perf_counter()
        per_expert = np.ndim(layers) > 0
        if not self._multipart:  # one contiguous host buffer per expert: one copy
            for i, (slot, expert) in enumerate(zip(slots.tolist(), experts.tolist())):
                layer = int(layers[i]) if per_expert else layers
                self._pool[slot].copy_(self._store.buffer(layer, expert))
        else:  # an expert in a few parts (views of the loader's shared memory): one copy per part into the slot
            self._stats.add_disk_bytes(layers, self._store.will_need(layers, experts))
            for i, (slot, expert) in enumerate(zip(slots.tolist(), experts.tolist())):
                layer = int(layers[i]) if per_expert else layers
                dst = self._pool[slot]
                for src, offset in self._store.parts(layer, expert):
                    dst[offset:offset + src.numel()].copy_(src)
        if urgent:
            self._stats.stall_s[layers] += time.perf_counter() - start

    def prefetches_in_flight(self) -> int:
        return 0

    def wait_ready(self, slots: list[int], layer: int) -> None:
        pass

    def release(self, slots: list[int], layer: int) -> None:
        pass

    def collect(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_copy_engine(device: torch.device, num_slots: int, stats: OffloadStats) -> CopyEngine:
    if device.type == "cuda":
        from .cuda_copy_engine import CudaCopyEngine  # deferred: the CPU path never touches CUDA

        return CudaCopyEngine(device, num_slots, stats)
    return SyncCopyEngine(stats)
