"""Host -> GPU copies of checkpoint bytes at PCIe speed: pinned sources, large chunks, a side stream, pipelined.

Two ways in, both ending in one device buffer per byte span (tensors are then views into it):

- :func:`copy_spans_to_device` -- the source is host memory that stays (the loader's shared-memory DRAM cache,
  mapped by :class:`~tritonmoe.loader.client.ShmCheckpoint`). Chunks are page-locked in place with
  ``cudaHostRegister`` (read-only, so a private mapping is not copied on write) by a few threads running ahead of
  the copies, so registering chunk *i + 1* overlaps the DMA of chunk *i*; the copy engine reads the shared pages
  directly, no bounce buffer. :class:`PinnedRegistry` keeps the registrations for later copies (expert fetches) and
  drops them on close. Where registration is refused, chunks go through a pinned staging ring instead.
- :func:`stream_reader_to_device` -- the source is a file (disk or page cache): reader threads ``pread`` chunks
  into a ring of pinned staging buffers and each filled buffer is copied while later chunks are still being read.

Copies are issued on one non-default stream with an event per chunk: the CPU waits only for a staging buffer it
wants to reuse, and once at the end. CUDA only; imported lazily.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger("tritonmoe.loader")
DEFAULT_COPY_CHUNK = 64 << 20  # >= 16 MiB reaches the pinned H2D ceiling (55 GB/s on the H100 machine)
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the GPU only reads; no copy-on-write of the pages
CUDA_SUCCESS = 0
CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712


def _cudart():
    return torch.cuda.cudart()


def _clear_last_error() -> None:
    try:
        from cuda.bindings import runtime

        runtime.cudaGetLastError()
    except ImportError:
        pass


def _side_stream_after_allocations(device: torch.device) -> torch.cuda.Stream:
    """A new stream for the copies, ordered after the work already queued on the current stream. The destination
    buffers come from the caching allocator on the current stream, which hands out memory freed there as soon as
    the freeing is *queued*: kernels still pending on that stream may read or write it. Writes from another stream
    must wait for them."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


# Every range this process has page-locked and not yet unregistered (start -> bytes), across registries. CUDA's
# "already registered" is trusted only for a range listed here: a registration whose memory was unmapped keeps the
# old pages locked, and copies from a new mapping at that address would read those stale pages.
_LIVE: dict[int, int] = {}
_LIVE_LOCK = threading.Lock()


def _unregister_all(ranges: dict[int, tuple[int, object]]) -> None:
    """Unregister ``ranges`` (start -> (bytes, owner)) and only then drop the owners, which keep the memory mapped:
    a range is never unmapped while it is registered."""
    if not ranges:
        return
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # copies from these pages may still be in flight
    for ptr in list(ranges):
        err = _cudart().cudaHostUnregister(ptr)
        if int(err) != CUDA_SUCCESS:
            _clear_last_error()
            log.warning("cudaHostUnregister(%#x) failed with CUDA error %d", ptr, int(err))
        with _LIVE_LOCK:
            _LIVE.pop(ptr, None)
    ranges.clear()


class PinnedRegistry:
    """Page-locked (registered) host ranges, unregistered on :meth:`close` or when the registry is dropped. Each
    range keeps the object that owns its memory (a mapping's tensor) alive until it is unregistered. Thread-safe."""

    def __init__(self):
        self._ranges: dict[int, tuple[int, object]] = {}
        self._lock = threading.Lock()
        self.failed: str | None = None
        self._release = weakref.finalize(self, _unregister_all, self._ranges)
        self._release.atexit = False  # at exit the process's registrations end with it; CUDA may be half torn down

    def register(self, ptr: int, nbytes: int, owner: object = None) -> bool:
        """Page-lock ``nbytes`` at ``ptr``; ``owner`` (kept until unregistered) is what keeps that memory mapped.
        False where CUDA refused: copies from it then go through a pinned staging buffer."""
        with self._lock:
            if ptr in self._ranges:
                return True
            if self.failed:
                return False
        err = int(_cudart().cudaHostRegister(ptr, nbytes, CUDA_HOST_REGISTER_READ_ONLY))
        if err == CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED:
            _clear_last_error()
            with _LIVE_LOCK:
                ours = _LIVE.get(ptr, 0) >= nbytes
            if not ours:
                log.warning("host range %#x+%d is page-locked by someone else in this process: copying it through "
                            "a pinned staging buffer", ptr, nbytes)
            return ours  # page-locked by another registry of this process, which unregisters it
        if err != CUDA_SUCCESS:
            _clear_last_error()  # not sticky, but torch would report it after its next kernel launch
            with self._lock:
                self.failed = f"cudaHostRegister failed with CUDA error {err}"
            log.warning("%s: copying through a pinned staging buffer instead", self.failed)
            return False
        with self._lock:
            self._ranges[ptr] = (nbytes, owner)
        with _LIVE_LOCK:
            _LIVE[ptr] = nbytes
        return True

    def close(self) -> None:
        self._release()

    @property
    def registered_bytes(self) -> int:
        return sum(n for n, _ in self._ranges.values())


def copy_spans_to_device(spans: list[tuple[torch.Tensor, int, int]], device: torch.device | str, *,
                         registry: PinnedRegistry | None = None, chunk_bytes: int = DEFAULT_COPY_CHUNK,
                         register_threads: int = 4) -> list[torch.Tensor]:
    """Copy each span ``(base, start, end)`` -- bytes [start, end) of the uint8 host tensor ``base`` -- into a new
    uint8 tensor on ``device``; returns them, complete.

    ``base`` is registered on a fixed grid of ``chunk_bytes`` pieces of itself, whatever the spans, so spans that
    share a piece never register it twice (CUDA refuses overlapping registrations). With a ``registry`` the pieces
    stay registered (a second call skips registering); without one they are unregistered before returning."""
    device = torch.device(device)
    own = registry is None
    registry = registry or PinnedRegistry()
    outs = [torch.empty(end - start, dtype=torch.uint8, device=device) for _, start, end in spans]
    chunks = []  # (span index, piece start, piece end, grid start, grid bytes)
    for i, (base, start, end) in enumerate(spans):
        for g in range(start // chunk_bytes * chunk_bytes, end, chunk_bytes):
            chunks.append((i, max(start, g), min(end, g + chunk_bytes), g, min(chunk_bytes, base.numel() - g)))
    stream = _side_stream_after_allocations(device)
    staging: StagingRing | None = None
    try:
        with ThreadPoolExecutor(register_threads, thread_name_prefix="tritonmoe-pin") as pool:
            # registration runs ahead of the copies on several threads; each copy waits only for its own chunk
            pinned = [pool.submit(registry.register, spans[i][0].data_ptr() + g, n, spans[i][0])
                      for i, _, _, g, n in chunks]
            with torch.cuda.stream(stream):
                for (i, lo, hi, _, _), ok in zip(chunks, pinned):
                    base, start, _ = spans[i]
                    src, dst = base[lo:hi], outs[i][lo - start:hi - start]
                    if ok.result():
                        dst.copy_(src, non_blocking=True)
                    else:
                        staging = staging or StagingRing(device, chunk_bytes, 4, stream)
                        staging.copy(src, dst)
        stream.synchronize()
    finally:
        if staging is not None:
            staging.close()
        if own:
            stream.synchronize()
            registry.close()
    return outs


def register_spans(spans: list[tuple[torch.Tensor, int, int]], registry: PinnedRegistry,
                   chunk_bytes: int = DEFAULT_COPY_CHUNK, threads: int = 4) -> bool:
    """Page-lock the grid pieces of each ``(base, start, end)`` span (the grid of copy_spans_to_device)."""
    jobs = [(base.data_ptr() + g, min(chunk_bytes, base.numel() - g), base)
            for base, start, end in spans for g in range(start // chunk_bytes * chunk_bytes, end, chunk_bytes)]
    with ThreadPoolExecutor(threads, thread_name_prefix="tritonmoe-pin") as pool:
        return all(pool.map(lambda job: registry.register(*job), jobs))


class StagingRing:
    """A ring of pinned buffers for copying from memory the GPU cannot read directly: memcpy into a free
    buffer, async copy from it, reuse it once its copy's event has completed."""

    def __init__(self, device: torch.device, chunk_bytes: int, slots: int, stream: torch.cuda.Stream):
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.stream = stream
        self._next = 0

    def acquire(self) -> int:
        slot = self._next
        self._next = (self._next + 1) % len(self.buffers)
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return slot

    def launch(self, slot: int, n: int, dst: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(self.buffers[slot][:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[slot] = event

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        slot = self.acquire()
        self.buffers[slot][:src.numel()].copy_(src)
        self.launch(slot, src.numel(), dst)

    def close(self) -> None:
        self.stream.synchronize()


def stream_reader_to_device(reader, device: torch.device | str, *, chunk_bytes: int = DEFAULT_COPY_CHUNK,
                            slots: int = 16, spans: list[tuple[int, int, int]] | None = None,
                            into: list[tuple[int, int, torch.Tensor]] = ()) -> list[torch.Tensor]:
    """Read byte spans of an open :class:`~tritonmoe.loader.reader.CheckpointReader` into new device buffers,
    through a ring of ``slots`` pinned staging buffers of ``chunk_bytes``: up to ``slots`` preads run at once on
    the reader's threads, and each finished chunk is copied to the GPU while later ones are being read.

    ``spans``: (partition, offset, bytes), default every whole partition. Returns one device uint8 tensor each.
    ``into``: more (partition, offset, destination) reads, each into a device uint8 tensor that already exists
    (e.g. a byte range of a model's parameter), in the same pipeline; all reads go in file order."""
    from .direct_io import read_ranges

    device = torch.device(device)
    if spans is None:
        spans = [(p, 0, size) for p, size in enumerate(reader.index.partitions)]
    outs = [torch.empty(n, dtype=torch.uint8, device=device) for _, _, n in spans]
    reads = [(partition, offset, out) for out, (partition, offset, _) in zip(outs, spans)] + list(into)
    jobs = sorted(((partition, offset + start, dst[start:start + chunk_bytes])
                   for partition, offset, dst in reads for start in range(0, dst.numel(), chunk_bytes)),
                  key=lambda job: job[:2])
    stream = _side_stream_after_allocations(device)
    ring = StagingRing(device, chunk_bytes, slots, stream)
    views = [memoryview(b.numpy()).cast("B") for b in ring.buffers]  # pinned, page-aligned: O_DIRECT works
    pool = reader._pool
    in_flight: deque = deque()  # (future, slot, n, dst) in issue order

    def read(slot: int, partition: int, offset: int, n: int) -> None:
        read_ranges([(reader._files[partition], offset, views[slot][:n])], _Inline, chunk_bytes)

    def drain_one() -> None:
        future, slot, n, dst = in_flight.popleft()
        future.result()
        ring.launch(slot, n, dst)

    try:
        for partition, offset, dst in jobs:
            if len(in_flight) == slots - 1:  # keep one slot for the copy engine to work on
                drain_one()
            slot = ring.acquire()
            in_flight.append((pool.submit(read, slot, partition, offset, dst.numel()), slot, dst.numel(), dst))
        while in_flight:
            drain_one()
        stream.synchronize()
    finally:
        for future, *_ in in_flight:
            future.exception()  # no thread may still write into a staging buffer we free
        ring.close()
    return outs


class _InlineExecutor:
    """An executor that runs the job in the calling thread (each pool thread already reads one chunk)."""

    class _Done:
        def __init__(self, error):
            self._error = error

        def exception(self):
            return self._error

    def submit(self, fn, *args):
        try:
            fn(*args)
            return self._Done(None)
        except BaseException as e:  # handed back through exception(), as a real future would
            return self._Done(e)


_Inline = _InlineExecutor()
