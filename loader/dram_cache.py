"""The DRAM tier: converted checkpoints held as files in shared memory (tmpfs, normally /dev/shm).

A model in the DRAM cache is a complete converted folder under ``<shm_dir>/<name>/``: the partitions, the side
files (config, tokenizer) and the index, written last. Backends ``mmap`` the partitions, so the weights are in
RAM once, however many processes use them, and survive a backend restart (and a loader restart: the loader
adopts complete folders it finds when it starts).

Filling: every partition file is reserved with ``posix_fallocate`` before it is written, so a tmpfs that runs out
of room fails with ENOSPC at once instead of killing the process with SIGBUS on a page fault halfway through;
then the checkpoint reader's parallel chunked preads (O_DIRECT where the disk's filesystem allows) land straight
in the mapped pages, and every tensor's checksum is verified before the folder is renamed into place. Nothing in
a half-filled staging folder (``.<name>.loading-*``) is ever served; the loader removes such folders at start-up.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .format import INDEX_FILE, CheckpointError, CheckpointIndex, partition_file_name, read_index
from .reader import CheckpointReader

log = logging.getLogger("tritonmoe.loader")


class DramBudgetError(CheckpointError):
    """A model cannot be placed in the DRAM cache: larger than the budget, or no room left in shared memory."""


@dataclass
class FillResult:
    index: CheckpointIndex
    seconds: float
    read_seconds: float
    verify_seconds: float
    direct_io: bool
    bytes_read: int


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(source: Path, dest: Path, *, threads: int, chunk_bytes: int, direct: bool = True,
         verify: bool = True) -> FillResult:
    """Copy the converted checkpoint at ``source`` into ``dest`` (in shared memory; must not exist)."""
    start = time.perf_counter()
    staging = dest.parent / f".{dest.name}.loading-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    maps: list[mmap.mmap] = []
    try:
        with CheckpointReader(source, direct=direct, threads=threads, chunk_bytes=chunk_bytes) as reader:
            index = reader.index
            log.info("%s: filling DRAM cache from %s with %s", dest.name, source,
                     "O_DIRECT reads" if reader.uses_direct_io else
                     f"buffered reads ({reader._files[0].direct_error if reader._files else 'no partitions'})")
            import torch

            buffers = []
            for number, size in enumerate(index.partitions):
                fd = os.open(staging / partition_file_name(number), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    if size:
                        try:
                            os.posix_fallocate(fd, 0, size)
                        except OSError as e:
                            if e.errno == errno.ENOSPC:
                                raise DramBudgetError(
                                    f"shared memory {dest.parent} is full: {dest.name} needs {index.total_bytes} "
                                    f"bytes, {free_bytes(dest.parent)} are free; evict a model or enlarge "
                                    "/dev/shm") from None
                            raise
                        maps.append(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
                        buffers.append(torch.frombuffer(maps[-1], dtype=torch.uint8))
                    else:
                        buffers.append(torch.empty(0, dtype=torch.uint8))
                finally:
                    os.close(fd)
            t_read = time.perf_counter()
            # every partition straight into its mapped shared-memory file (the returned views are not needed)
            reader.load_state_dict(verify=False, buffers=buffers)
            read_seconds = time.perf_counter() - t_read
            t_verify = time.perf_counter()
            if verify:  # in the reader's thread pool; a ChecksumError names the tensor
                reader._check_all({name: (entry, buffers[entry.partition][entry.offset:entry.offset + entry.bytes])
                                   for name, entry in index.tensors.items()})
            verify_seconds = time.perf_counter() - t_verify
            direct_io = reader.uses_direct_io
        del buffers
        for m in maps:
            m.close()
        maps = []
        for side in index.side_files:
            target = staging / side
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / side, target)
        (staging / INDEX_FILE).write_text(index.to_json())  # last: a folder with an index is complete
        os.rename(staging, dest)
    except BaseException:
        for m in maps:
            try:
                m.close()
            except BufferError:  # a view still exists; the mapping goes with the process or the GC
                pass
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FillResult(index, time.perf_counter() - start, read_seconds, verify_seconds, direct_io,
                      index.total_bytes)


def remove(folder: Path) -> None:
    """Drop a cached folder. Renamed first so it vanishes at once; processes that mapped its partitions keep
    their mappings (tmpfs frees the pages when the last mapping goes)."""
    if not folder.exists():
        return
    doomed = folder.parent / f".{folder.name}.evicted-{uuid.uuid4().hex[:8]}"
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def scan(shm_dir: Path) -> dict[str, CheckpointIndex]:
    """Complete cached folders in ``shm_dir`` (name -> index); removes leftovers of interrupted fills."""
    found = {}
    for entry in sorted(shm_dir.iterdir()):
        if entry.name.startswith("."):
            log.info("removing leftover %s (an interrupted load or eviction)", entry)
            shutil.rmtree(entry, ignore_errors=True)
            continue
        try:
            index = read_index(entry)
            sizes = [(entry / partition_file_name(i)).stat().st_size for i in range(len(index.partitions))]
            if sizes != index.partitions:
                raise CheckpointError("partition sizes differ from the index")
        except (CheckpointError, OSError) as e:
            log.warning("removing %s from the DRAM cache: %s", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
            continue
        found[entry.name] = index
    return found
