"""Host-to-device expert copies on dedicated CUDA streams, through cuda-python; nothing here blocks the CPU.

- Two copy streams: on-demand fetches go to a high-priority stream and are issued at once; prefetches go to a
  low-priority stream, and the caller keeps only a small window of them issued (``prefetches_in_flight``), so a
  demand fetch waits behind at most that window, never behind the whole prefetch queue.
- One ``ready`` event per *batch* of copies (a ``load_many`` call), recorded on its stream after the batch's last
  copy; each slot remembers its batch's event. A stream runs its copies in order, so the event having run means
  every copy of the batch has landed: one record per batch instead of one per expert (a driver call saved per
  copy). Events come from a ring per copy stream; a ring event re-recorded by a later batch of the *same* stream
  only makes a wait on it wait for more, never less. The compute stream waits only when a layer is about to read
  slots whose copies may not have finished, and then once per copy stream, on the latest of those copies.
- One ``released`` event per MoE layer, recorded on the compute stream once the kernels of that layer's round
  have been issued; each slot remembers the layer that last read it, and a later copy into the slot waits on that
  layer's event, so it cannot overwrite weights still in use. (The event's latest record is at or after the
  slot's last read: the wait is exact or later, never earlier. One record per round, not one per slot.) A copy
  stream waits on a given record of that event once: later copies on the stream come after that wait anyway.
- A copy into a slot whose previous copy may still be running waits on that copy's ``ready`` event only when it
  ran on the other stream (on the same stream, order already serialises them).
- Copies are addressed by pointer arithmetic on the pool and the host tier (no tensor views per copy). A
  multi-part store (experts viewed in the loader's shared memory) gets one copy per part, same stream, before the
  slot's ``ready`` event; the source must be page-locked for the copies to be asynchronous.
- The calls on the hot path go through cuda-python's driver API (``cuMemcpyHtoDAsync``, ``cuEventRecord``,
  ``cuStreamWaitEvent``, ``cuEventQuery``), the thinnest binding; streams and events are made once, through the
  runtime API, in the primary context torch uses. ``api="runtime"`` runs the same engine on the runtime API's
  equivalents (kept for the overhead comparison in ``timing``).
- Stall time is measured on the GPU by a pair of timing events around each wait, read back later without
  blocking (``collect``).

Imported only when the cache lives on a CUDA device.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from cuda.bindings import driver, runtime as cudart

_RT_SUCCESS = cudart.cudaError_t.cudaSuccess
_H2D = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
_DEMAND, _PREFETCH = 0, 1


def _check_rt(result):
    """Runtime API: cuda-python returns ``(err, *values)``; raise on error, return the value(s)."""
    err, values = result[0], result[1:]
    if err != _RT_SUCCESS:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


class _Calls:
    """The hot path's four calls and the stream wrapper, bound to one cuda-python API. Each call returns the
    API's ``(err, ...)`` tuple; ``ok`` / ``not_ready`` are that API's codes."""

    def __init__(self, api: str):
        if api == "driver":
            self.ok, self.not_ready = driver.CUresult.CUDA_SUCCESS, driver.CUresult.CUDA_ERROR_NOT_READY
            self.invalid_context = driver.CUresult.CUDA_ERROR_INVALID_CONTEXT
            self.copy = driver.cuMemcpyHtoDAsync  # (dst, src, nbytes, stream)
            self.record = driver.cuEventRecord  # (event, stream)
            self.wait = driver.cuStreamWaitEvent  # (stream, event, 0)
            self.query = driver.cuEventQuery  # (event)
            self.stream = driver.CUstream
        elif api == "runtime":
            self.ok, self.not_ready = _RT_SUCCESS, cudart.cudaError_t.cudaErrorNotReady
            self.invalid_context = None
            self.copy = lambda dst, src, nbytes, stream: cudart.cudaMemcpyAsync(dst, src, nbytes, _H2D, stream)
            self.record = cudart.cudaEventRecord
            self.wait = cudart.cudaStreamWaitEvent
            self.query = cudart.cudaEventQuery
            self.stream = cudart.cudaStream_t
        else:
            raise ValueError(f"api must be 'driver' or 'runtime', not {api!r}")
        self.api = api

    def error(self, err) -> RuntimeError:
        if self.api == "driver":
            _, name = driver.cuGetErrorName(err)
        else:
            _, name = cudart.cudaGetErrorName(err)
        return RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")


def _raw_stream_getter():
    """The current CUDA stream of a device as an integer handle: torch's direct accessor when it has one (a C
    call), else through a Stream object."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


class CudaCopyEngine:
    def __init__(self, device: torch.device, num_slots: int, stats, api: str = "driver"):
        self._device_index = device.index if device.index is not None else torch.cuda.current_device()
        self._stats = stats
        self._calls = _Calls(api)
        with torch.cuda.device(self._device_index):  # streams and events belong to the current device
            _check_rt(cudart.cudaSetDevice(self._device_index))
            lowest, highest = _check_rt(cudart.cudaDeviceGetStreamPriorityRange())
            demand = _check_rt(cudart.cudaStreamCreateWithPriority(cudart.cudaStreamNonBlocking, highest))
            prefetch = _check_rt(cudart.cudaStreamCreateWithPriority(cudart.cudaStreamNonBlocking, lowest))
            # per copy stream: more events than slots, so a slot's event is re-recorded only after num_slots
            # later batches of its stream (by then the copy has long landed; waiting on a later record is safe)
            self._rings = tuple([_check_rt(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming))
                                 for _ in range(num_slots + 2)] for _ in range(2))
        self._rt_streams = (demand, prefetch)  # for close()
        self._streams = tuple(self._calls.stream(int(s)) for s in self._rt_streams)  # indexed _DEMAND / _PREFETCH
        self._raw_stream = _raw_stream_getter()
        self._compute_raw, self._compute = None, None  # the compute stream last seen, and its handle
        self._released: list = []  # per MoE layer, created in bind()
        self._released_gen: list[int] = []  # per MoE layer: how many times its event has been recorded
        self._waited: tuple[list[int], list[int]] = ([], [])  # per copy stream, per layer: the record waited on
        self._ring_next = [0, 0]
        self._ready: list = [None] * num_slots  # per slot: the event of the batch that copied into it last
        self._last_reader = [-1] * num_slots  # per slot: the MoE layer whose kernels read it last, -1: none yet
        # slots whose latest copy may still be running -> (copy stream, issue number); prefetches in issue order
        self._loading: dict[int, tuple[int, int]] = {}
        self._prefetching: dict[int, None] = {}
        self._issued = 0  # copies issued so far (numbers them)
        self._issued_at_last_wait = 0
        self._free_timers: list[tuple] = []
        self._bound_event = None  # recorded on the compute stream at bind(); the copy streams wait for it once
        self._pending_timers: deque[tuple[int, object, object]] = deque()  # (layer, start, end)

    def _run(self, fn, *args):
        """One hot-path call; raises on error."""
        result = fn(*args)
        if result[0] != self._calls.ok:
            if result[0] == self._calls.invalid_context:
                result = self._with_context(fn, args)
            if result[0] != self._calls.ok:
                raise self._calls.error(result[0])
        return result

    def _done(self, event) -> bool:
        err = self._calls.query(event)[0]
        if err == self._calls.invalid_context:
            err = self._with_context(self._calls.query, (event,))[0]
        if err == self._calls.not_ready:
            return False
        if err != self._calls.ok:
            raise self._calls.error(err)
        return True

    def _with_context(self, fn, args):
        """``fn(*args)`` again on a thread where no CUDA context was current (the driver API needs one; the runtime
        makes torch's current lazily): the device's primary context is made current first, once per thread."""
        _check_rt(cudart.cudaSetDevice(self._device_index))
        _check_rt(cudart.cudaFree(0))
        return fn(*args)

    def bind(self, pool: torch.Tensor, store) -> None:
        """The cache pool ``[num_slots, slot_bytes]`` copies go into, and the host tier they come from."""
        self._dst0 = pool.data_ptr()
        self._nbytes = store.layout.slot_bytes
        self._store, self._file_backed = store, getattr(store, "file_backed", False)
        if getattr(store, "multipart", False):
            # per layer, per expert: (source address, offset in the slot, bytes) of each part
            self._src0 = None
            self._parts = [[[(src.data_ptr(), offset, src.numel()) for src, offset in store.parts(layer, expert)
                             if src.numel()] for expert in range(store.num_experts)]
                           for layer in range(store.num_layers)]
        else:
            self._src0 = [store.buffer(layer, 0).data_ptr() for layer in range(store.num_layers)]
        with torch.cuda.device(self._device_index):
            self._released = [_check_rt(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming))
                              for _ in range(store.num_layers)]
            allocated = _check_rt(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming))
        self._released_gen = [0] * store.num_layers
        self._waited = ([-1] * store.num_layers, [-1] * store.num_layers)
        # The pool came from torch's caching allocator on the current stream, which reuses memory as soon as its
        # freeing is queued there: kernels still pending on that stream may touch it. The copy streams do not
        # synchronise with it (non-blocking), so they wait once for everything queued on it so far.
        self._run(self._calls.record, allocated, self._compute_stream())
        for stream in self._streams:
            self._run(self._calls.wait, stream, allocated, 0)
        self._bound_event = allocated  # destroyed in close()

    def _compute_stream(self):
        raw = self._raw_stream(self._device_index)
        if raw != self._compute_raw:
            self._compute_raw, self._compute = raw, self._calls.stream(raw)
        return self._compute

    def load_many(self, slots, layers, experts, urgent: bool) -> None:
        which = _DEMAND if urgent else _PREFETCH
        stream = self._streams[which]
        calls, run = self._calls, self._run
        nbytes, dst0, src0 = self._nbytes, self._dst0, self._src0
        waited, gen, released = self._waited[which], self._released_gen, self._released
        loading, prefetching, last_reader = self._loading, self._prefetching, self._last_reader
        per_expert = np.ndim(layers) > 0
        layer_list = layers.tolist() if per_expert else None
        slot_list = slots.tolist()
        if not slot_list:
            return
        ready = self._ready
        issued = self._issued
        if self._file_backed:  # the disk tier: start reading the whole batch from disk before the first copy
            self._stats.add_disk_bytes(layers, self._store.will_need(layers, experts))
        for i, (slot, expert) in enumerate(zip(slot_list, experts.tolist())):
            layer = layer_list[i] if per_expert else layers
            # The slot's old contents may still be read by issued kernels, or still be arriving on the other stream.
            reader = last_reader[slot]
            if reader >= 0 and waited[reader] != gen[reader]:
                run(calls.wait, stream, released[reader], 0)
                waited[reader] = gen[reader]
            previous = loading.get(slot)
            if previous is not None and previous[0] != which:
                run(calls.wait, stream, ready[slot], 0)
            if src0 is not None:  # packed host tier: one copy per expert
                run(calls.copy, dst0 + slot * nbytes, src0[layer] + expert * nbytes, nbytes, stream)
            else:  # multi-part expert: one copy per part, all on this stream before the slot's ready event
                dst = dst0 + slot * nbytes
                for src, offset, size in self._parts[layer][expert]:
                    run(calls.copy, dst + offset, src, size, stream)
            issued += 1
            loading[slot] = (which, issued)
            prefetching.pop(slot, None)  # re-inserted below for a prefetch: the dict stays in issue order
            if not urgent:
                prefetching[slot] = None
        ring, at = self._rings[which], self._ring_next[which]
        event = ring[at]
        self._ring_next[which] = (at + 1) % len(ring)
        run(calls.record, event, stream)
        for slot in slot_list:
            ready[slot] = event
        self._issued = issued

    def prefetches_in_flight(self) -> int:
        # in issue order, on one stream: once one has not finished, none after it has (a batch's slots share an
        # event: asked once)
        done, finished = [], None
        for slot in self._prefetching:
            event = self._ready[slot]
            if event is not finished:
                if not self._done(event):
                    break
                finished = event
            done.append(slot)
        for slot in done:
            del self._prefetching[slot]
            del self._loading[slot]
        return len(self._prefetching)

    def wait_ready(self, slots: list[int], layer: int) -> None:
        loading = self._loading
        latest = [None, None]  # per copy stream: (issue number, slot) of the latest copy still to wait for
        fresh = self._issued_at_last_wait
        for slot in slots:
            copy = loading.get(slot)
            if copy is None:
                continue
            which, number = copy
            # a demand copy issued since the last wait has not finished: no need to ask
            if not (which == _DEMAND and number > fresh) and self._done(self._ready[slot]):
                del loading[slot]
                self._prefetching.pop(slot, None)
                continue
            if latest[which] is None or number > latest[which][0]:
                latest[which] = (number, slot)
        self._issued_at_last_wait = self._issued
        if latest[0] is None and latest[1] is None:
            return
        calls, run = self._calls, self._run
        stream = self._compute_stream()
        start, end = self._free_timers.pop() if self._free_timers else (
            _check_rt(cudart.cudaEventCreate()), _check_rt(cudart.cudaEventCreate()))
        run(calls.record, start, stream)
        for pick in latest:
            if pick is not None:
                run(calls.wait, stream, self._ready[pick[1]], 0)
        run(calls.record, end, stream)
        self._pending_timers.append((layer, start, end))
        self.collect()

    def release(self, slots, layer: int) -> None:
        self._run(self._calls.record, self._released[layer], self._compute_stream())
        self._released_gen[layer] += 1
        last_reader = self._last_reader
        for slot in slots.tolist() if hasattr(slots, "tolist") else slots:
            last_reader[slot] = layer

    def collect(self) -> None:
        """Add the stalls the GPU has finished timing to the stats; never waits."""
        while self._pending_timers and self._done(self._pending_timers[0][2]):
            layer, start, end = self._pending_timers.popleft()
            self._stats.stall_s[layer] += _check_rt(cudart.cudaEventElapsedTime(start, end)) / 1000.0
            self._free_timers.append((start, end))

    def close(self) -> None:
        """Finish the copies in flight, then free the streams and events (only here may the CPU wait)."""
        for stream in self._rt_streams:
            _check_rt(cudart.cudaStreamSynchronize(stream))
        torch.cuda.current_stream(self._device_index).synchronize()
        self.collect()
        events = (self._rings[0] + self._rings[1] + self._released + [e for pair in self._free_timers for e in pair]
                  + ([self._bound_event] if self._bound_event is not None else []))
        for event in events:
            _check_rt(cudart.cudaEventDestroy(event))
        for stream in self._rt_streams:
            _check_rt(cudart.cudaStreamDestroy(stream))
        self._rings, self._released, self._free_timers, self._bound_event = ([], []), [], [], None
