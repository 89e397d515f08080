"""The remote tier: fetch a converted checkpoint folder from any fsspec URL into the local disk cache.

A converted folder lists every file it holds in its index (partitions and side files), so the fetch needs no
directory listing, which plain HTTP servers cannot give: read ``tritonmoe_index.json``, then copy each file it
names. Files are fetched in parallel into a hidden staging folder that is renamed into place only when every
file is there with the size the index records, so an interrupted fetch never leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .format import INDEX_FILE, CheckpointError, CheckpointIndex, partition_file_name

log = logging.getLogger("tritonmoe.loader")


class RemoteError(CheckpointError):
    """The remote tier failed: unreachable, timed out, or serving something that is not a converted checkpoint."""


def is_url(source: str) -> bool:
    return "://" in source


def _filesystem(url: str, timeout: float):
    import fsspec

    protocol = url.split("://", 1)[0]
    options = {}
    if protocol in ("http", "https"):
        import aiohttp

        # A remote that accepts the connection and then stalls must fail, not hang a load forever: bound the
        # connect and every wait for the next bytes (not the whole transfer, which may legitimately be long).
        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                     sock_read=timeout)}
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root.rstrip("/")


def _describe(url: str, exc: BaseException, timeout: float) -> str:
    import asyncio

    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "timeout" in type(exc).__name__.lower():
        return f"remote {url} timed out (no data for {timeout:g} s)"
    return f"cannot fetch {url}: {type(exc).__name__}: {exc}"


def read_remote_index(url: str, timeout: float = 30.0) -> CheckpointIndex:
    """The index of the converted checkpoint at ``url`` (fetched and validated, nothing else read)."""
    fs, root = _filesystem(url, timeout)
    try:
        text = fs.cat_file(f"{root}/{INDEX_FILE}")
    except FileNotFoundError:
        raise RemoteError(f"{url} is not a converted tritonmoe checkpoint (no {INDEX_FILE})") from None
    except Exception as e:  # fsspec implementations raise their own types
        raise RemoteError(_describe(f"{url}/{INDEX_FILE}", e, timeout)) from e
    return CheckpointIndex.from_json(text.decode() if isinstance(text, bytes) else text, f"{url}/{INDEX_FILE}")


def fetch_checkpoint(url: str, dest: Path, *, timeout: float = 30.0, threads: int = 4) -> CheckpointIndex:
    """Copy the converted checkpoint at ``url`` into ``dest`` (which must not exist); returns its index."""
    dest = Path(dest)
    index = read_remote_index(url, timeout)
    fs, root = _filesystem(url, timeout)
    staging = dest.parent / f".{dest.name}.fetching-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    files = [(partition_file_name(i), size) for i, size in enumerate(index.partitions)]
    files += [(side, None) for side in index.side_files]
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="tritonmoe-fetch") as pool:
            futures = [pool.submit(_fetch_file, fs, f"{root}/{name}", staging / name, size, url, timeout)
                       for name, size in files]
            errors = [f.exception() for f in futures]  # wait for every copy before removing the staging folder
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        (staging / INDEX_FILE).write_text(index.to_json())  # last, as the converter does
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    log.info("fetched %s into %s: %.2f GB in %.2f s", url, dest, index.total_bytes / 1e9, seconds)
    return index


def _fetch_file(fs, remote: str, local: Path, size: int | None, url: str, timeout: float) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(remote, str(local))  # streams; works for every fsspec protocol (HTTP needs no Range support)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise RemoteError(f"no space left on the disk cache while fetching {remote}") from e
        raise RemoteError(_describe(remote, e, timeout)) from e
    except Exception as e:
        raise RemoteError(_describe(remote, e, timeout)) from e
    if size is not None and local.stat().st_size != size:
        raise RemoteError(f"{remote} has {local.stat().st_size} bytes but the index records {size}: the remote "
                          "checkpoint is incomplete or does not match its index")
