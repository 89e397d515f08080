"""Backend side of the loader service: an HTTP client, and the mapped DRAM copy of a checkpoint.

    client = LoaderClient("http://127.0.0.1:8073")          # token: argument or $TRITONMOE_LOADER_TOKEN
    client.register("mixtral", "/models/mixtral-converted")  # or "https://host/mixtral", "s3://bucket/mixtral"
    with client.ensure_loaded("mixtral") as ckpt:            # returns once the model is in the DRAM cache
        sd = ckpt.state_dict()                               # CPU tensors viewing the shared memory, no copy
        gpu = ckpt.to_device("cuda:0", names=ckpt.non_expert_names())   # pinned, chunked, pipelined
        raw = ckpt.expert_bytes(layer=3, expert=5)           # one expert's contiguous bytes, a view

The client uses only the standard library (urllib), so it runs inside a Triton Python-backend stub. Every failure
is a :class:`LoaderError` whose message says what happened and what to do; a loader that dies while a load is in
flight gives "the loader ... went away", and calling ``ensure_loaded`` again once it is back succeeds.
"""

from __future__ import annotations

import http.client
import json
import mmap
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from .format import CheckpointError, TensorEntry, align_up, partition_file_name, read_index
from .reader import tensor_from_bytes

DEFAULT_URL = "http://127.0.0.1:8073"


class LoaderError(RuntimeError):
    """The loader service refused or failed a request, or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LoaderClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 3600.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("TRITONMOE_LOADER_TOKEN") or None
        self.timeout = timeout  # a load of a large model from a remote tier can take minutes

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
                 raw: bool = False):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text or e.reason
            raise LoaderError(f"loader {self.url}: {method} {path} failed ({e.code}): {message}", e.code) from None
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead,
                BrokenPipeError) as e:
            raise LoaderError(f"the loader {self.url} went away during {method} {path} ({type(e).__name__}); "
                              "nothing was loaded: retry once the loader is running again") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise LoaderError(f"cannot reach the loader {self.url} ({method} {path}): {reason}; start it with "
                              "`python -m tritonmoe.loader.service --root DIR --dram-budget BYTES "
                              "--disk-budget BYTES`") from None
        return payload.decode() if raw else json.loads(payload)

    def health(self) -> dict:
        return self._request("GET", "/health", timeout=10)

    def register(self, name: str, source: str | os.PathLike) -> dict:
        source = str(source)
        if "://" not in source:
            source = str(Path(source).resolve())
        return self._request("POST", "/v1/models", {"name": name, "source": source})

    def status(self, name: str | None = None) -> dict:
        if name is None:
            return self._request("GET", "/v1/models")
        return self._request("GET", f"/v1/models/{urllib.parse.quote(name, safe='')}")

    def load(self, name: str) -> dict:
        """Make ``name`` DRAM-resident; returns its status (with ``shm_path``) once it is."""
        return self._request("POST", f"/v1/models/{urllib.parse.quote(name, safe='')}/load")

    def ensure_loaded(self, name: str, attempts: int = 3) -> "ShmCheckpoint":
        for attempt in range(attempts):
            status = self.load(name)
            try:
                ckpt = ShmCheckpoint(status["shm_path"], expect_fingerprint=status.get("fingerprint"))
                break
            except (OSError, CheckpointError) as e:
                # evicted (LRU, or by hand) between the answer and the mapping: ask again
                if attempt == attempts - 1:
                    raise LoaderError(f"{name} left the DRAM cache of {self.url} before it could be mapped "
                                      f"({e}); the DRAM budget may be too small for the models in use") from e
        if status.get("gpu_copy"):
            ckpt.loader = (self, name)  # to_device may ask the loader to do the copies
        return ckpt

    def copy_to_device(self, name: str, spans: list[tuple[int, int, int]], device) -> list[torch.Tensor]:
        """Allocate one device buffer per (partition, start, end) span and have the loader (started with
        ``--gpu-copy``) fill them from its page-locked DRAM copy through CUDA IPC. Returns the filled buffers."""
        from .gpu_copy_server import share_cuda_buffer

        buffers = [torch.empty(end - start, dtype=torch.uint8, device=device) for _, start, end in spans]
        targets = [dict(share_cuda_buffer(buf), spans=[[p, start, end, 0]])
                   for buf, (p, start, end) in zip(buffers, spans)]
        torch.cuda.synchronize(device)  # the allocations exist before another process writes into them
        self._request("POST", f"/v1/models/{urllib.parse.quote(name, safe='')}/copy", {"targets": targets})
        return buffers

    def evict(self, name: str, tier: str = "dram") -> dict:
        return self._request("POST", f"/v1/models/{urllib.parse.quote(name, safe='')}/evict?tier={tier}")

    def unregister(self, name: str) -> dict:
        return self._request("DELETE", f"/v1/models/{urllib.parse.quote(name, safe='')}")

    def metrics(self) -> str:
        return self._request("GET", "/metrics", raw=True)


class ShmCheckpoint:
    """A converted checkpoint in the loader's shared memory, mapped into this process.

    The partitions are mapped copy-on-write (``MAP_PRIVATE``): reads share the loader's pages, and a stray write
    by model code stays private instead of corrupting the cache that other processes use. The folder also holds
    config and tokenizer files, so ``path`` works wherever a converted folder does. Any converted folder maps the
    same way: the disk tier of expert offloading (``expert_host_tier: disk``) maps one on disk."""

    def __init__(self, path: str | os.PathLike, expect_fingerprint: str | None = None):
        self.path = Path(path)
        self.index = read_index(self.path)
        if expect_fingerprint is not None and self.index.fingerprint != expect_fingerprint:
            raise CheckpointError(f"{self.path} holds another model than the loader reported (fingerprint "
                                  f"{self.index.fingerprint} != {expect_fingerprint}); load it again")
        self.partitions: list[torch.Tensor] = []
        self._maps: list[mmap.mmap] = []
        self._registry = None
        self.loader: tuple[LoaderClient, str] | None = None  # set by ensure_loaded when the loader copies to GPUs
        for number, size in enumerate(self.index.partitions):
            file = self.path / partition_file_name(number)
            with open(file, "rb") as f:
                actual = os.fstat(f.fileno()).st_size
                if actual != size:  # mapping past the end would SIGBUS on first touch
                    raise CheckpointError(f"{file} is {actual} bytes but the index records {size}; reload the model")
                if size == 0:
                    self.partitions.append(torch.empty(0, dtype=torch.uint8))
                    continue
                m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            self._maps.append(m)
            self.partitions.append(torch.frombuffer(m, dtype=torch.uint8))

    def __enter__(self) -> "ShmCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unregister pinned ranges (also done when this object is dropped unclosed) and drop this object's
        references to the mappings; tensors handed out keep their mapping alive until they are freed."""
        if self._registry is not None:
            self._registry.close()
            self._registry = None
        self.partitions, self._maps = [], []

    # ---- CPU views ---------------------------------------------------------------------------------------------
    def raw(self, entry: TensorEntry) -> torch.Tensor:
        return self.partitions[entry.partition][entry.offset:entry.offset + entry.bytes]

    def tensor(self, name: str) -> torch.Tensor:
        entry = self.index.tensors[name]
        return tensor_from_bytes(self.raw(entry), entry)

    def state_dict(self, names=None) -> dict[str, torch.Tensor]:
        """Tensors with their HF names, viewing the shared memory (no copy). ``names``: a subset."""
        names = self.index.tensors if names is None else names
        return {name: self.tensor(name) for name in names}

    def expert_names(self) -> set[str]:
        return {n for e in self.index.experts for n in e.tensors}

    def non_expert_names(self) -> list[str]:
        experts = self.expert_names()
        return [n for n in self.index.tensors if n not in experts]

    def expert_bytes(self, layer: int, expert: int, module: str | None = None) -> torch.Tensor:
        """One routed expert's whole byte range (uint8, contiguous): one copy moves the expert."""
        e = self.index.expert(layer, expert, module)
        return self.partitions[e.partition][e.offset:e.offset + e.bytes]

    def verify(self, names=None) -> None:
        """Check the checksums of ``names`` (default all) against the index."""
        import xxhash

        from .format import ChecksumError

        for name in self.index.tensors if names is None else names:
            entry = self.index.tensors[name]
            actual = xxhash.xxh3_64_hexdigest(self.raw(entry).numpy())
            if actual != entry.checksum:
                raise ChecksumError(name, entry.checksum, actual, str(self.path))

    def _locate(self, view: torch.Tensor) -> tuple[int, int]:
        """(partition, byte offset) of a uint8 view of this mapping."""
        ptr = view.data_ptr()
        for number, part in enumerate(self.partitions):
            start = part.data_ptr()
            if part.numel() and start <= ptr and ptr + view.numel() <= start + part.numel():
                return number, ptr - start
        raise ValueError("the view is not inside one partition of this mapping")

    # ---- device copies -----------------------------------------------------------------------------------------
    def spans(self, names) -> list[tuple[int, int, int]]:
        """The fewest (partition, start, end) byte ranges that cover ``names`` and no other tensor (padding
        between neighbours is included): each becomes one device buffer, copied in large chunks."""
        chosen = set(names)
        spans = []
        order = sorted(self.index.tensors.items(), key=lambda kv: (kv[1].partition, kv[1].offset))
        current = None
        for name, e in order:
            if e.bytes == 0:
                continue
            if name not in chosen:
                if current is not None:
                    spans.append(current)
                    current = None
                continue
            end = min(align_up(e.offset + e.bytes), self.index.partitions[e.partition])
            if current is not None and current[0] == e.partition:
                current = (current[0], current[1], end)
            else:
                if current is not None:
                    spans.append(current)
                current = (e.partition, e.offset, end)
        if current is not None:
            spans.append(current)
        return spans

    def pin(self, chunk_bytes: int | None = None) -> None:
        """Page-lock every partition in place (CUDA), kept until :meth:`close`: later :meth:`to_device` calls
        and expert copies then run at full PCIe speed straight from the shared memory. Costs what page-locking
        costs on the host (measured 1.3 GB/s on the H100 VM), so it pays off for memory copied repeatedly."""
        from .device_copy import DEFAULT_COPY_CHUNK, PinnedRegistry, register_spans

        if self._registry is None:
            self._registry = PinnedRegistry()
        register_spans([(p, 0, p.numel()) for p in self.partitions if p.numel()], self._registry,
                       chunk_bytes or DEFAULT_COPY_CHUNK)

    def verify(self, threads: int = 8) -> None:
        """Check every tensor's checksum against the index, reading through the mapping (file pages, no copy in
        this process's memory); raises :class:`~tritonmoe.loader.format.ChecksumError` naming the first bad one."""
        from concurrent.futures import ThreadPoolExecutor

        from .reader import check_checksum

        def check(item):
            name, entry = item
            check_checksum(name, entry, self.raw(entry), self.path)

        with ThreadPoolExecutor(threads, thread_name_prefix="tritonmoe-verify") as pool:
            list(pool.map(check, self.index.tensors.items()))

    @property
    def pinned(self) -> bool:
        return self._registry is not None and self._registry.registered_bytes >= sum(self.index.partitions)

    def to_device(self, device: torch.device | str, names=None, *, method: str = "auto",
                  chunk_bytes: int | None = None, threads: int = 16,
                  into: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> dict[str, torch.Tensor]:
        """``names`` (default all) as tensors on ``device``: the covering spans are copied into one device buffer
        each and the tensors are views into those; copies run on a side stream in large chunks.

        ``method`` (CUDA): "loader" has the loader service copy from its page-locked memory into buffers allocated
        here (CUDA IPC; loaders started with ``--gpu-copy``); "pinned" copies straight from the shared memory, page-locking chunks in place (pipelined
        with the copies) unless :meth:`pin` did; "staged" preads the shared-memory files on ``threads`` threads
        into a ring of pinned buffers, each copied while the next are filled; "auto" is "loader" where the loader
        offers it, else "pinned" when the mapping is already page-locked, else "staged" (faster than page-locking
        in this process where page-locking is slow).

        ``into``: (source, destination) pairs copied in the same pipeline ("staged" only): a source is a uint8 view
        of one partition of this mapping (e.g. from :meth:`raw`), its destination a device uint8 tensor of the same
        size that already exists (a byte range of a model's parameter)."""
        device = torch.device(device)
        names = list(self.index.tensors if names is None else names)
        if device.type != "cuda":
            return {n: t.to(device) for n, t in self.state_dict(names).items()}
        from .device_copy import DEFAULT_COPY_CHUNK, PinnedRegistry, copy_spans_to_device, stream_reader_to_device
        from .reader import CheckpointReader

        chunk_bytes = chunk_bytes or DEFAULT_COPY_CHUNK
        if method == "auto":
            method = "loader" if self.loader is not None else "pinned" if self.pinned else "staged"
        if into and method != "staged":
            raise ValueError(f"copies into existing buffers go through the staged path, not {method!r}")
        spans = self.spans(names)
        if method == "loader":
            if self.loader is None:
                raise ValueError("method='loader' needs a checkpoint from LoaderClient.ensure_loaded of a loader "
                                 "started with --gpu-copy")
            client, model = self.loader
            buffers = client.copy_to_device(model, spans, device)
        elif method == "pinned":
            if self._registry is None:
                self._registry = PinnedRegistry()
            buffers = copy_spans_to_device([(self.partitions[p], s, e) for p, s, e in spans], device,
                                           registry=self._registry, chunk_bytes=chunk_bytes)
        elif method == "staged":
            with CheckpointReader(self.path, direct=False, threads=threads, chunk_bytes=chunk_bytes) as reader:
                buffers = stream_reader_to_device(reader, device, chunk_bytes=chunk_bytes,
                                                  spans=[(p, s, e - s) for p, s, e in spans],
                                                  into=[(*self._locate(src), dst) for src, dst in into])
        else:
            raise ValueError(f"method must be auto, pinned or staged, got {method!r}")
        out = {}
        span_of = {}
        for i, (p, s, e) in enumerate(spans):
            span_of.setdefault(p, []).append((s, e, i))
        for name in names:
            entry = self.index.tensors[name]
            if entry.bytes == 0:  # belongs to no span
                out[name] = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype), device=device)
                continue
            s, _, i = next(x for x in span_of[entry.partition] if x[0] <= entry.offset < x[1])
            raw = buffers[i][entry.offset - s:entry.offset - s + entry.bytes]
            out[name] = tensor_from_bytes(raw, entry)
        return out
