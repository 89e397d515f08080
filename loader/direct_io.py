"""Parallel chunked reads of file ranges into caller-owned buffers, with O_DIRECT where the filesystem allows.

Reads land in a ``memoryview`` the caller owns (a torch tensor's storage today, a shared-memory segment in the
loader service later), so no intermediate copy is made. O_DIRECT skips the page cache and its copy; it needs the
file offset, length and buffer address aligned, which the format guarantees for offsets and lengths and
`aligned_buffer` guarantees for addresses. Any part that is not aligned is read buffered.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from .format import ALIGNMENT, CheckpointError

log = logging.getLogger("tritonmoe.loader")
DEFAULT_CHUNK_BYTES = 32 << 20  # large sequential requests keep an NVMe queue full without huge per-thread buffers
DEFAULT_THREADS = 8


def buffer_address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class RangeFile:
    """A file opened for range reads: O_DIRECT when asked for and supported, buffered otherwise."""

    def __init__(self, path: str | os.PathLike, direct: bool = True):
        self.path = os.fspath(path)
        self._buffered_fd = os.open(self.path, os.O_RDONLY)
        self.direct_error = None if direct else "not requested"
        self._direct_fd = self._open_direct() if direct else None
        # Cleared when O_DIRECT reads fail; the fd stays open until close() since other threads may be using it.
        self._direct_works = self._direct_fd is not None

    def _open_direct(self) -> int | None:
        if not hasattr(os, "O_DIRECT"):
            self.direct_error = "O_DIRECT does not exist on this platform"
            return None
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:  # tmpfs and some FUSE filesystems refuse O_DIRECT with EINVAL
            self.direct_error = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
            return None

    @property
    def direct(self) -> bool:
        return self._direct_works

    def size(self) -> int:
        return os.fstat(self._buffered_fd).st_size

    def read_into(self, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` with the file's bytes from ``offset``; the aligned prefix goes through O_DIRECT."""
        direct_len = 0
        if self.direct and offset % ALIGNMENT == 0 and len(dest) >= ALIGNMENT \
                and buffer_address(dest) % ALIGNMENT == 0:
            direct_len = len(dest) - len(dest) % ALIGNMENT
        if direct_len:
            try:
                self._pread_fully(self._direct_fd, offset, dest[:direct_len])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Opening worked but reading does not (seen on some network filesystems): stop trying.
                self.direct_error = f"EINVAL on read: {e.strerror}"
                if self._direct_works:
                    log.warning("O_DIRECT reads fail on %s (%s); using buffered reads", self.path, e.strerror)
                self._direct_works = False
                direct_len = 0
        self._pread_fully(self._buffered_fd, offset + direct_len, dest[direct_len:])

    def _pread_fully(self, fd: int, offset: int, dest: memoryview) -> None:
        done = 0
        while done < len(dest):
            n = os.preadv(fd, [dest[done:]], offset + done)
            if n == 0:
                raise CheckpointError(f"{self.path} ends at byte {offset + done}, before the {len(dest)} bytes "
                                      f"expected from offset {offset}: the file is truncated")
            done += n

    def close(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
        os.close(self._buffered_fd)


def read_ranges(jobs: list[tuple[RangeFile, int, memoryview]], pool: ThreadPoolExecutor,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Read every (file, offset, dest) job, split into ``chunk_bytes`` pieces that the pool's threads read
    concurrently with pread (which releases the GIL). Raises the first error after all reads have stopped."""
    if chunk_bytes % ALIGNMENT:
        raise ValueError(f"chunk_bytes must be a multiple of {ALIGNMENT}")
    futures = []
    for file, offset, dest in jobs:
        for start in range(0, len(dest), chunk_bytes):
            futures.append(pool.submit(file.read_into, offset + start, dest[start:start + chunk_bytes]))
    errors = [f.exception() for f in futures]  # waits for all: no thread may still write into dest afterwards
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
