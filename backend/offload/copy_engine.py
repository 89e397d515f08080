"""Moving an expert from its host buffer into a cache slot.

Every engine offers the same five calls, made by the cache and the layer computation in this order:
``load`` (start filling a slot: ``urgent`` for an on-demand fetch, else a prefetch), ``wait_ready`` (the
computation is about to read these slots), ``release`` (the computation has been issued; the slots may be
overwritten once it has run), ``prefetches_in_flight``, ``collect`` (fold finished timings into the stats),
``close``.

:class:`SyncCopyEngine` is the CPU engine: plain synchronous ``copy_``. The CUDA engine lives in
``cuda_copy_engine`` and is imported only when the cache lives on a CUDA device, so nothing CUDA is loaded here.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from .stats import OffloadStats


class CopyEngine(Protocol):
    def load(self, slot: int, dst: torch.Tensor, src: torch.Tensor, urgent: bool, layer: int) -> None: ...

    def prefetches_in_flight(self) -> int: ...

    def wait_ready(self, slots: list[int], layer: int) -> None: ...

    def release(self, slots: list[int]) -> None: ...

    def collect(self) -> None: ...

    def close(self) -> None: ...


class SyncCopyEngine:
    """Copies complete before ``load`` returns; the computation waits exactly for the on-demand ones."""

    def __init__(self, stats: OffloadStats):
        self._stats = stats

    def load(self, slot: int, dst: torch.Tensor, src: torch.Tensor, urgent: bool, layer: int) -> None:
        start = time.perf_counter()
        dst.copy_(src)
        if urgent:
            self._stats.stall_s[layer] += time.perf_counter() - start

    def prefetches_in_flight(self) -> int:
        return 0

    def wait_ready(self, slots: list[int], layer: int) -> None:
        pass

    def release(self, slots: list[int]) -> None:
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
