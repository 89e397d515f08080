"""GPU copies done by the loader service itself, into memory a backend process allocated (CUDA IPC).

Page-locking host memory is slow (measured 1.3 GB/s on the H100 VM, a third of a second per GB), and it is per
process: a backend that maps the DRAM cache and page-locks it on every start pays that before copying at PCIe
speed. The loader is long-lived, so it page-locks each model once, when it enters the DRAM cache, and copies on
request: the backend allocates its device buffers, shares them through CUDA IPC (``torch.multiprocessing``'s
reduction of a CUDA tensor: an IPC memory handle plus offsets), and the loader writes the requested byte spans
straight from its page-locked shared memory into them -- ServerlessLLM's store does the same. Enabled with
``--gpu-copy``; needs torch with CUDA in the loader's environment.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from .device_copy import DEFAULT_COPY_CHUNK

log = logging.getLogger("tritonmoe.loader")


def share_cuda_buffer(buf: torch.Tensor) -> dict:
    """The backend side: a JSON-able description of ``buf`` (a CUDA uint8 tensor) that another process can open."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buf)
    (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": offset,
            "device_uuid": str(torch.cuda.get_device_properties(device).uuid), "handle": handle.hex(),
            "storage_bytes": storage_bytes, "storage_offset": storage_offset, "ref_handle": ref_handle.hex(),
            "ref_offset": ref_offset, "event_handle": event_handle.hex() if event_handle else None,
            "event_sync": event_sync}


def _open_cuda_buffer(doc: dict, device: int) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(doc["size"]), tuple(doc["stride"]), doc["offset"], torch.UntypedStorage,
        torch.uint8, device, bytes.fromhex(doc["handle"]), doc["storage_bytes"], doc["storage_offset"], False,
        bytes.fromhex(doc["ref_handle"]), doc["ref_offset"],
        bytes.fromhex(doc["event_handle"]) if doc["event_handle"] else None, doc["event_sync"])


class GpuCopier:
    """In the loader process: page-locked DRAM-cache models, and copies into backends' shared device buffers."""

    def __init__(self):
        if not torch.cuda.is_available():
            raise RuntimeError("--gpu-copy needs a CUDA GPU and torch with CUDA in the loader's environment")
        self._devices = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
        self._pinned: dict[str, object] = {}  # model name -> ShmCheckpoint with every partition page-locked
        self._lock = threading.Lock()

    def pin(self, name: str, path) -> float:
        """Map and page-lock the DRAM copy of ``name``; returns the seconds it took."""
        from .client import ShmCheckpoint

        start = time.perf_counter()
        ck = ShmCheckpoint(path)
        ck.pin()
        with self._lock:
            old = self._pinned.pop(name, None)
            self._pinned[name] = ck
        if old is not None:
            old.close()
        seconds = time.perf_counter() - start
        log.info("%s page-locked for GPU copies: %.2f GB in %.2f s", name, ck.index.total_bytes / 1e9, seconds)
        return seconds

    def unpin(self, name: str) -> None:
        with self._lock:
            ck = self._pinned.pop(name, None)
        if ck is not None:
            ck.close()

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def copy(self, name: str, path, request: dict) -> dict:
        """Copy spans of ``name`` into the backend's buffers. ``request``: {"targets": [{buffer description...,
        "spans": [[partition, start, end, dest_offset], ...]}]}."""
        if not self.is_pinned(name):
            self.pin(name, path)  # adopted from an earlier run, or unpinned: once
        ck = self._pinned[name]
        start = time.perf_counter()
        total = 0
        targets = request.get("targets", [])
        uuids = {t["device_uuid"] for t in targets}
        if len(uuids) > 1:
            raise ValueError("one copy request serves one device")
        if not uuids:
            return {"bytes": 0, "seconds": 0.0}
        uuid = uuids.pop()
        if uuid not in self._devices:
            raise ValueError(f"GPU {uuid} is not visible to the loader (it sees {sorted(self._devices)})")
        device = self._devices[uuid]
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            opened = []
            with torch.cuda.stream(stream):
                for target in targets:
                    dst = _open_cuda_buffer(target, device)
                    opened.append(dst)
                    for partition, lo, hi, dest in target["spans"]:
                        if dest < 0 or dest + (hi - lo) > dst.numel():
                            raise ValueError(f"span [{lo}, {hi}) of partition {partition} does not fit the buffer")
                        # one copy per page-locked piece: a copy spanning two registrations fails (invalid value)
                        grid = DEFAULT_COPY_CHUNK
                        for g in range(lo // grid * grid, hi, grid):
                            a, b = max(lo, g), min(hi, g + grid)
                            dst[dest + a - lo:dest + b - lo].copy_(ck.partitions[partition][a:b], non_blocking=True)
                        total += hi - lo
            stream.synchronize()
            del opened
        seconds = time.perf_counter() - start
        return {"bytes": total, "seconds": seconds}
