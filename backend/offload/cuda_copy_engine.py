"""Host-to-device expert copies on dedicated CUDA streams, through cuda-python; nothing here blocks the CPU.

- Two copy streams: on-demand fetches go to a high-priority stream and are issued at once; prefetches go to a
  low-priority stream, and the caller keeps only a small window of them issued (``prefetches_in_flight``), so a
  demand fetch waits behind at most that window, never behind the whole prefetch queue.
- One ``ready`` event per cache slot, recorded after the slot's copy: the compute stream waits on it only when a
  layer is about to read that slot, and only if the copy has not finished yet. No stream or device synchronize.
- One ``released`` event per MoE layer, recorded on the compute stream once the kernels of that layer's round
  have been issued; each slot remembers the layer that last read it, and a later copy into the slot waits on that
  layer's event, so it cannot overwrite weights still in use. (The event's latest record is at or after the
  slot's last read: the wait is exact or later, never earlier. One record per round, not one per slot.)
- Copies are addressed by pointer arithmetic on the pool and the host tier (no tensor views per copy). A
  multi-part store (experts viewed in the loader's shared memory) gets one copy per part, same stream, before the
  slot's ``ready`` event; the source must be page-locked for the copies to be asynchronous.
- Stall time is measured on the GPU by a pair of timing events around each wait, read back later without
  blocking (``collect``).

Imported only when the cache lives on a CUDA device.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from cuda.bindings import runtime as cudart

from .stats import OffloadStats

_SUCCESS = cudart.cudaError_t.cudaSuccess
_NOT_READY = cudart.cudaError_t.cudaErrorNotReady


def _check(result):
    """cuda-python returns ``(err, *values)``: raise on error, return the value(s)."""
    err, values = result[0], result[1:]
    if err != _SUCCESS:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


def _done(event) -> bool:
    (err,) = cudart.cudaEventQuery(event)
    if err == _NOT_READY:
        return False
    _check((err,))
    return True


class CudaCopyEngine:
    def __init__(self, device: torch.device, num_slots: int, stats: OffloadStats):
        self._device_index = device.index if device.index is not None else torch.cuda.current_device()
        self._stats = stats
        with torch.cuda.device(self._device_index):  # streams and events belong to the current device
            _check(cudart.cudaSetDevice(self._device_index))
            lowest, highest = _check(cudart.cudaDeviceGetStreamPriorityRange())
            self._demand_stream = _check(cudart.cudaStreamCreateWithPriority(cudart.cudaStreamNonBlocking, highest))
            self._prefetch_stream = _check(cudart.cudaStreamCreateWithPriority(cudart.cudaStreamNonBlocking, lowest))
            self._ready = [_check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming))
                           for _ in range(num_slots)]
        self._released: list = []  # per MoE layer, created in bind()
        self._last_reader = [-1] * num_slots  # per slot: the MoE layer whose kernels read it last, -1: none yet
        self._loading: set[int] = set()  # slots whose latest copy may still be running
        self._prefetching: set[int] = set()  # those of them that are prefetches
        self._free_timers: list[tuple] = []
        self._pending_timers: deque[tuple[int, object, object]] = deque()  # (layer, start, end)

    def bind(self, pool: torch.Tensor, store) -> None:
        """The cache pool ``[num_slots, slot_bytes]`` copies go into, and the host tier they come from."""
        self._dst0 = pool.data_ptr()
        self._nbytes = store.layout.slot_bytes
        if getattr(store, "multipart", False):
            # per layer, per expert: (source address, offset in the slot, bytes) of each part
            self._src0 = None
            self._parts = [[[(src.data_ptr(), offset, src.numel()) for src, offset in store.parts(layer, expert)
                             if src.numel()] for expert in range(store.num_experts)]
                           for layer in range(store.num_layers)]
        else:
            self._src0 = [store.buffer(layer, 0).data_ptr() for layer in range(store.num_layers)]
        with torch.cuda.device(self._device_index):
            self._released = [_check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming))
                              for _ in range(store.num_layers)]

    def _compute_stream(self):
        return cudart.cudaStream_t(torch.cuda.current_stream(self._device_index).cuda_stream)

    def load_many(self, slots, layers, experts, urgent: bool) -> None:
        stream = self._demand_stream if urgent else self._prefetch_stream
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        nbytes, dst0, src0 = self._nbytes, self._dst0, self._src0
        per_expert = np.ndim(layers) > 0
        layer_list = layers.tolist() if per_expert else None
        for i, (slot, expert) in enumerate(zip(slots.tolist(), experts.tolist())):
            layer = layer_list[i] if per_expert else layers
            # The slot's old contents may still be read by issued kernels, or still be arriving on the other stream.
            reader = self._last_reader[slot]
            if reader >= 0:
                _check(cudart.cudaStreamWaitEvent(stream, self._released[reader], 0))
            if slot in self._loading:
                _check(cudart.cudaStreamWaitEvent(stream, self._ready[slot], 0))
            if src0 is not None:  # packed host tier: one copy per expert
                _check(cudart.cudaMemcpyAsync(dst0 + slot * nbytes, src0[layer] + expert * nbytes, nbytes, kind,
                                              stream))
            else:  # multi-part expert: one copy per part, all on this stream before the slot's ready event
                dst = dst0 + slot * nbytes
                for src, offset, size in self._parts[layer][expert]:
                    _check(cudart.cudaMemcpyAsync(dst + offset, src, size, kind, stream))
            _check(cudart.cudaEventRecord(self._ready[slot], stream))
            self._loading.add(slot)
            if urgent:
                self._prefetching.discard(slot)
            else:
                self._prefetching.add(slot)

    def prefetches_in_flight(self) -> int:
        for slot in [s for s in self._prefetching if _done(self._ready[s])]:
            self._prefetching.discard(slot)
            self._loading.discard(slot)
        return len(self._prefetching)

    def wait_ready(self, slots: list[int], layer: int) -> None:
        pending = []
        for slot in slots:
            if slot in self._loading:
                if _done(self._ready[slot]):
                    self._loading.discard(slot)
                    self._prefetching.discard(slot)
                else:
                    pending.append(slot)
        if not pending:
            return
        stream = self._compute_stream()
        start, end = self._free_timers.pop() if self._free_timers else (
            _check(cudart.cudaEventCreate()), _check(cudart.cudaEventCreate()))
        _check(cudart.cudaEventRecord(start, stream))
        for slot in pending:
            _check(cudart.cudaStreamWaitEvent(stream, self._ready[slot], 0))
        _check(cudart.cudaEventRecord(end, stream))
        self._pending_timers.append((layer, start, end))
        self.collect()

    def release(self, slots, layer: int) -> None:
        _check(cudart.cudaEventRecord(self._released[layer], self._compute_stream()))
        for slot in slots.tolist() if hasattr(slots, "tolist") else slots:
            self._last_reader[slot] = layer

    def collect(self) -> None:
        """Add the stalls the GPU has finished timing to the stats; never waits."""
        while self._pending_timers and _done(self._pending_timers[0][2]):
            layer, start, end = self._pending_timers.popleft()
            self._stats.stall_s[layer] += _check(cudart.cudaEventElapsedTime(start, end)) / 1000.0
            self._free_timers.append((start, end))

    def close(self) -> None:
        """Finish the copies in flight, then free the streams and events (only here may the CPU wait)."""
        for stream in (self._demand_stream, self._prefetch_stream):
            _check(cudart.cudaStreamSynchronize(stream))
        torch.cuda.current_stream(self._device_index).synchronize()
        self.collect()
        events = self._ready + self._released + [e for pair in self._free_timers for e in pair]
        for event in events:
            _check(cudart.cudaEventDestroy(event))
        for stream in (self._demand_stream, self._prefetch_stream):
            _check(cudart.cudaStreamDestroy(stream))
        self._ready, self._released, self._free_timers = [], [], []
