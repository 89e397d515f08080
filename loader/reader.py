"""Read a converted checkpoint: single tensors, whole experts, or everything as a state_dict with the HF names.

Opening a checkpoint checks the index against the partition files before anything is read, so a truncated
partition or an index from another conversion fails at once with a clear error. Reads are parallel chunked
preads (direct_io) into buffers whose tensors are then views: loading to the CPU makes no copy after the read.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from .direct_io import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS, RangeFile, read_ranges
from .format import (ALIGNMENT, CheckpointError, ChecksumError, ExpertEntry, TensorEntry, align_up,
                     partition_file_name, read_index)

log = logging.getLogger("tritonmoe.loader")


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose address is ALIGNMENT-aligned, as O_DIRECT needs."""
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % ALIGNMENT
    return raw[shift:shift + nbytes]


def writable_view(buffer: torch.Tensor) -> memoryview:
    return memoryview(buffer.numpy()).cast("B")


def tensor_from_bytes(raw: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """View ``entry``'s bytes (a uint8 tensor holding exactly them) as the tensor they encode, without a copy."""
    return raw.view(getattr(torch, entry.dtype)).as_strided(entry.shape, entry.stride)


class CheckpointReader:
    """An open converted checkpoint. Use as a context manager, or call close().

    ``direct``: try O_DIRECT (the log says when the filesystem refuses it and buffered reads are used).
    ``threads`` and ``chunk_bytes``: how many preads run at once, and how large each is."""

    def __init__(self, folder: str | os.PathLike, *, direct: bool = True, threads: int = DEFAULT_THREADS,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.chunk_bytes = chunk_bytes
        self._files: list[RangeFile] = []
        try:
            self._open_partitions(direct)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tritonmoe-read")
        if self._files and not self._files[0].direct and direct:
            log.info("O_DIRECT unavailable for %s (%s): using buffered reads", self.folder, self._files[0].direct_error)
        else:
            log.debug("reading %s with %s", self.folder, "O_DIRECT" if direct else "buffered reads")

    def _open_partitions(self, direct: bool) -> None:
        expected = {partition_file_name(i) for i in range(len(self.index.partitions))}
        strays = sorted(p.name for p in self.folder.glob("partition-*.bin") if p.name not in expected)
        if strays:
            raise CheckpointError(f"{self.folder}: partition files {', '.join(strays)} are not in the index: "
                                  "the index does not match the data; reconvert the model")
        for number, size in enumerate(self.index.partitions):
            path = self.folder / partition_file_name(number)
            if not path.is_file():
                raise CheckpointError(f"{self.folder}: {path.name} is missing (the index lists it); reconvert")
            file = RangeFile(path, direct=direct)
            self._files.append(file)
            actual = file.size()
            if actual != size:
                what = "truncated" if actual < size else "longer than the index says"
                raise CheckpointError(f"{path} is {actual} bytes but the index records {size}: the partition is "
                                      f"{what} or the index does not match the data; reconvert the model")

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if hasattr(self, "_pool"):
            self._pool.shutdown()
        for file in self._files:
            file.close()
        self._files = []

    @property
    def uses_direct_io(self) -> bool:
        return bool(self._files) and self._files[0].direct

    # -- raw byte ranges: the primitives a service reads into shared memory with ------------------------------

    def read_range_into(self, partition: int, offset: int, dest: memoryview) -> None:
        """Read ``len(dest)`` bytes of ``partition`` from ``offset`` into ``dest`` with parallel chunked preads.
        Fastest when ``offset``, ``len(dest)`` and dest's address are multiples of ALIGNMENT."""
        if offset < 0 or offset + len(dest) > self.index.partitions[partition]:
            raise ValueError(f"range [{offset}, {offset + len(dest)}) is outside partition {partition}")
        read_ranges([(self._files[partition], offset, dest)], self._pool, self.chunk_bytes)

    def read_expert_into(self, layer: int, expert: int, dest: memoryview, module: str | None = None) -> ExpertEntry:
        """Copy one expert's whole byte range into ``dest`` (at least entry.bytes long); its tensors then sit at
        ``tensor.offset - entry.offset`` in ``dest``. Returns the expert's entry."""
        entry = self.index.expert(layer, expert, module)
        self.read_range_into(entry.partition, entry.offset, dest[:entry.bytes])
        return entry

    # -- tensors ---------------------------------------------------------------------------------------------

    def read_tensor(self, name: str, verify: bool = True) -> torch.Tensor:
        entry = self.index.tensors[name]
        buffer = aligned_buffer(align_up(entry.bytes))  # aligned length keeps the whole read on O_DIRECT
        self.read_range_into(entry.partition, entry.offset, writable_view(buffer))
        raw = buffer[:entry.bytes]
        if verify:
            self._check(name, entry, raw)
        return tensor_from_bytes(raw, entry)

    def read_expert(self, layer: int, expert: int, module: str | None = None,
                    verify: bool = True) -> dict[str, torch.Tensor]:
        """One expert's tensors, read with one range read, as views into a single buffer."""
        entry = self.index.expert(layer, expert, module)
        buffer = aligned_buffer(entry.bytes)
        self.read_expert_into(layer, expert, writable_view(buffer), module)
        members = {n: self.index.tensors[n] for n in entry.tensors}
        raws = {n: buffer[t.offset - entry.offset:t.offset - entry.offset + t.bytes] for n, t in members.items()}
        if verify:
            self._check_all({n: (members[n], raws[n]) for n in members})
        return {n: tensor_from_bytes(raws[n], members[n]) for n in members}

    def load_state_dict(self, device: str | torch.device | None = None, verify: bool = True,
                        buffers: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, keyed by its Hugging Face name (the source checkpoint's keys), so the result feeds
        ``model.load_state_dict`` or ``from_pretrained(state_dict=...)``. On the CPU the tensors are views into
        one buffer per partition: fresh ones, or ``buffers`` (uint8 CPU tensors of the partitions' sizes, e.g.
        shared or pinned memory the caller allocated once); with ``device`` they are copied there. Nothing is
        returned unless every read succeeded and, with ``verify``, every checksum matched."""
        if buffers is None:
            buffers = [aligned_buffer(size) for size in self.index.partitions]
        elif [b.numel() for b in buffers] != self.index.partitions or any(b.dtype != torch.uint8 for b in buffers):
            raise ValueError(f"buffers must be uint8 tensors of the partition sizes {self.index.partitions}")
        read_ranges([(file, 0, writable_view(buf)) for file, buf in zip(self._files, buffers)],
                    self._pool, self.chunk_bytes)
        raws = {name: (entry, buffers[entry.partition][entry.offset:entry.offset + entry.bytes])
                for name, entry in self.index.tensors.items()}
        if verify:
            self._check_all(raws)
        tensors = {name: tensor_from_bytes(raw, entry) for name, (entry, raw) in raws.items()}
        if device is not None and torch.device(device).type != "cpu":
            tensors = {name: t.to(device) for name, t in tensors.items()}
        return tensors

    def verify(self) -> None:
        """Re-read every partition (one at a time, to bound memory) and check every tensor's checksum."""
        for number, size in enumerate(self.index.partitions):
            buffer = aligned_buffer(size)
            self.read_range_into(number, 0, writable_view(buffer))
            self._check_all({name: (entry, buffer[entry.offset:entry.offset + entry.bytes])
                             for name, entry in self.index.tensors.items() if entry.partition == number})

    # -- checksums -------------------------------------------------------------------------------------------

    def _check(self, name: str, entry: TensorEntry, raw: torch.Tensor) -> None:
        check_checksum(name, entry, raw, self.folder)

    def _check_all(self, items: dict[str, tuple[TensorEntry, torch.Tensor]]) -> None:
        # xxhash releases the GIL, so the read pool hashes tensors in parallel.
        futures = [self._pool.submit(self._check, name, entry, raw) for name, (entry, raw) in items.items()]
        for future in futures:
            future.result()


def check_checksum(name: str, entry: TensorEntry, raw: torch.Tensor, folder: Path) -> None:
    """Raise :class:`ChecksumError` unless the bytes ``raw`` of tensor ``name`` hash to its index's checksum
    (xxhash releases the GIL: threads hash in parallel)."""
    actual = xxhash.xxh3_64_hexdigest(raw.numpy())
    if actual != entry.checksum:
        raise ChecksumError(name, entry.checksum, actual, str(folder / partition_file_name(entry.partition)))


def load_state_dict(folder: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True,
                    **reader_options) -> dict[str, torch.Tensor]:
    """Open ``folder``, load every tensor with its HF name (see CheckpointReader.load_state_dict), close it."""
    with CheckpointReader(folder, **reader_options) as reader:
        return reader.load_state_dict(device=device, verify=verify)
