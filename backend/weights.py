"""Everything a served model needs before its first request: weights on the device, tokenizer, expert offloading.

Two checkpoint layouts are read: a Hugging Face folder (``from_pretrained``) and tritonmoe's loading-optimised
format (``tritonmoe-convert``, read by :mod:`tritonmoe.loader`). With offloading on, the model is built on the host
and :func:`~tritonmoe.backend.offload.attach_offloading` moves its non-expert weights to the device and its routed
experts into the host tier behind a device expert cache.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_folder, load_model, load_tokenizer, resolve_dtype
from .config import EngineConfig

log = logging.getLogger("tritonmoe")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    offloader: object | None  # tritonmoe.backend.offload.Offloader when experts are offloaded
    layout: str  # "huggingface" or "tritonmoe"
    phases: dict[str, float] = field(default_factory=dict)  # start-up phase -> seconds


def is_converted(path: Path) -> bool:
    from tritonmoe.loader.format import INDEX_FILE

    return (path / INDEX_FILE).is_file()


@contextmanager
def _phase(phases: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - t0


def load_for_serving(cfg: EngineConfig, device: torch.device) -> LoadedModel:
    if cfg.offload is not None and cfg.offload.host_tier == "disk":
        return _load_with_disk_tier(cfg, device)
    if cfg.loader_url:
        return _load_through_loader(cfg, device)
    phases: dict[str, float] = {}
    path = cfg.checkpoint
    converted = path.is_dir() and is_converted(path)
    # experts go to the host tier first when offloading, so the device never holds more than its cache
    build_on = torch.device("cpu") if cfg.offload is not None else device
    with _phase(phases, "weights"):
        if converted:
            model = _load_converted(path, build_on, cfg.dtype)
        else:
            model = load_model(path, build_on, cfg.dtype)
    return _finish(model, cfg, device, path, "tritonmoe" if converted else "huggingface", phases)


def _finish(model, cfg: EngineConfig, device: torch.device, files: Path, layout: str,
            phases: dict[str, float], host_store=None) -> LoadedModel:
    """What every load path does last: the experts (offloaded, or resident with the chosen kernel), the tokenizer.
    ``host_store``: the offloading host tier, when the load path built one (experts in the loader's shared memory);
    without one the model's expert parameters are packed into a new one."""
    offloader = None
    if cfg.offload is None:
        _choose_experts_kernel(model, cfg.experts_implementation, device)
    else:
        from tritonmoe.backend.offload import attach_offloading

        with _phase(phases, "offload_setup"):
            try:
                offloader = attach_offloading(model, cfg.offload, device=device, host_store=host_store)
            except ValueError as e:
                raise CheckpointError(f"cannot offload the experts of {cfg.checkpoint}: {e}") from e
    with _phase(phases, "tokenizer"):
        tokenizer = load_tokenizer(files)
    return LoadedModel(model, tokenizer, offloader, layout, phases)


def _choose_experts_kernel(model: torch.nn.Module, choice: str, device: torch.device) -> None:
    """transformers' default expert kernel loops over the experts hit and synchronises with the GPU in every MoE
    layer; grouped_mm runs a layer's experts as one grouped GEMM with no host round trip (bf16, Hopper or newer)."""
    if choice == "auto":
        dtype = next(model.parameters()).dtype
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        if not (hopper and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
            return
        choice = "grouped_mm"
    model.set_experts_implementation(choice)
    log.info(f"experts run with transformers' {choice!r} kernel")


def _load_converted(path: Path, device: torch.device, dtype: str) -> torch.nn.Module:
    from tritonmoe.loader.format import CheckpointError as FormatError
    from tritonmoe.loader.hf_model import load_hf_model

    config = check_folder(path, weights_glob="*.bin")
    torch_dtype = resolve_dtype(dtype, device, config.get("dtype", config.get("torch_dtype")))
    try:
        return load_hf_model(path, device, torch_dtype).eval()
    except FormatError as e:
        raise CheckpointError(f"cannot load the converted checkpoint {path}: {e}") from e


# ---- through the per-host loader service (config parameter `loader_url`) -------------------------------------------
# DRAM copies already mapped in this process (shm path -> ShmCheckpoint): a warm engine-pool worker started with
# --prepin-loader maps and page-locks the loader's DRAM-resident models before its claim (backend/engine_worker.py).
PREOPENED: dict[str, object] = {}


def _loader_model_name(client, checkpoint: Path) -> str:
    """A converted folder is registered under its folder name plus a hash of its path (so two folders of the same
    name never collide); anything else is taken as the name of a model already registered at the loader."""
    import hashlib
    import re

    if checkpoint.is_dir():
        folder = checkpoint.resolve()
        stem = re.sub(r"[^A-Za-z0-9._-]", "-", folder.name).lstrip(".-_")[:100] or "model"
        name = f"{stem}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
        client.register(name, folder)
        return name
    return str(checkpoint)


def _load_through_loader(cfg: EngineConfig, device: torch.device) -> LoadedModel:
    """Weights from the loader's DRAM cache (shared memory mapped here): non-expert weights to ``device`` by pinned,
    pipelined copies; with offloading the experts are read from the mapping into the host tier."""
    from tritonmoe.loader.client import LoaderClient, LoaderError, ShmCheckpoint
    from tritonmoe.loader.format import CheckpointError as FormatError
    from tritonmoe.loader.hf_model import load_hf_model_from_shm

    phases: dict[str, float] = {}
    client = LoaderClient(cfg.loader_url)
    try:
        with _phase(phases, "dram_fill"):  # register if needed, then wait until the model is in the DRAM cache
            name = _loader_model_name(client, cfg.checkpoint)
            status = client.load(name)
        with _phase(phases, "index_read"):  # read the index and map the partitions
            ckpt = PREOPENED.pop(status["shm_path"], None)  # mapped (and page-locked) by a warm pool worker
            if ckpt is not None and ckpt.index.fingerprint != status.get("fingerprint"):
                ckpt.close()  # the loader refilled that folder with another model since
                ckpt = None
            if ckpt is None:
                ckpt = ShmCheckpoint(status["shm_path"], expect_fingerprint=status.get("fingerprint"))
            else:
                log.info("using the mapping of %s made before this load (page-locked: %s)", ckpt.path, ckpt.pinned)
        config = check_folder(ckpt.path, weights_glob="*.bin")
        torch_dtype = resolve_dtype(cfg.dtype, device, config.get("dtype", config.get("torch_dtype")))
        host_store = None
        tier = cfg.offload.host_tier if cfg.offload is not None else None
        if tier == "shared" or (tier == "auto" and device.type != "cuda"):
            # the host tier: the shared memory itself where the experts map onto it
            host_store = _shm_host_store(ckpt, device, torch_dtype, cfg, phases)
        if cfg.offload is None:
            model = load_hf_model_from_shm(ckpt, device, torch_dtype, phases=phases).eval()  # + gpu_copy, build
        else:
            # Offloaded: built on the host, as the non-loader path does, without a device_map (transformers would
            # dispatch CPU-mapped experts with accelerate's offload hooks, and pre-reserve the experts' bytes on
            # the GPU); attach_offloading then moves the non-expert weights to the device (from the page-locked
            # mapping when it is pinned). The experts: stand-ins when the host tier is the shared memory, else
            # fused by transformers on the host for the packed tier.
            model = load_hf_model_from_shm(ckpt, "cpu", torch_dtype,
                                           experts_device="meta" if host_store is not None else "cpu",
                                           phases=phases).eval()
    except (LoaderError, FormatError) as e:
        raise CheckpointError(f"cannot load {cfg.checkpoint} through the loader at {cfg.loader_url}: {e}") from e
    loaded = _finish(model, cfg, device, ckpt.path, "tritonmoe-loader", phases,  # the DRAM copy has the tokenizer
                     host_store=host_store)
    log.info("loaded %s through the loader %s (%s): %s", cfg.checkpoint, cfg.loader_url, ckpt.path,
             ", ".join(f"{k} {v:.3f}s" for k, v in phases.items()))
    return loaded


def _load_with_disk_tier(cfg: EngineConfig, device: torch.device) -> LoadedModel:
    """Offloading whose host tier is the converted checkpoint's files on disk, memory-mapped: a cache miss reads
    the expert through the OS page cache, which keeps what memory allows, so host memory need not hold all the
    experts. Every tensor's checksum is checked first, through the mapping. Nothing is page-locked (a mapping
    larger than memory cannot be), so on a GPU expert copies are synchronous, at pageable-copy speed."""
    from tritonmoe.loader.client import ShmCheckpoint
    from tritonmoe.loader.format import CheckpointError as FormatError
    from tritonmoe.loader.hf_model import ExpertMappingError, load_hf_model_from_shm

    path = cfg.checkpoint
    if cfg.loader_url:
        raise CheckpointError("expert_host_tier 'disk' reads the experts from a local converted checkpoint; with "
                              "loader_url they come from the loader's DRAM cache (expert_host_tier shared or packed)")
    if not (path.is_dir() and is_converted(path)):
        raise CheckpointError(f"expert_host_tier 'disk' needs a converted checkpoint (tritonmoe-convert); {path} "
                              f"is not one")
    phases: dict[str, float] = {}
    try:
        with _phase(phases, "index_read"):
            ckpt = ShmCheckpoint(path)
        with _phase(phases, "verify"):
            ckpt.verify()
        config = check_folder(path, weights_glob="*.bin")
        torch_dtype = resolve_dtype(cfg.dtype, device, config.get("dtype", config.get("torch_dtype")))
        try:
            host_store = _mapped_host_store(ckpt, device, torch_dtype, cfg, phases, pin=False,
                                            where="the checkpoint's files on disk, memory-mapped", file_backed=True)
        except ExpertMappingError as e:
            raise CheckpointError(f"expert_host_tier 'disk' cannot serve the experts of {path} from its files: {e}; "
                                  f"use expert_host_tier packed") from e
        model = load_hf_model_from_shm(ckpt, "cpu", torch_dtype, experts_device="meta", phases=phases).eval()
    except (FormatError, OSError) as e:  # a missing or unreadable partition file too
        raise CheckpointError(f"cannot load {path} with expert_host_tier 'disk': {e}") from e
    loaded = _finish(model, cfg, device, path, "tritonmoe", phases, host_store=host_store)
    log.info("loaded %s with the experts' host tier on disk (memory-mapped): %s", path,
             ", ".join(f"{k} {v:.3f}s" for k, v in phases.items()))
    return loaded


def _shm_host_store(ckpt, device: torch.device, dtype: torch.dtype, cfg: EngineConfig, phases: dict[str, float]):
    """The offloading host tier as views of the loader's shared memory (:func:`_mapped_host_store`), or None --
    logged with the reason -- where the checkpoint's expert tensors are not byte ranges of transformers' fused
    expert parameters (dtype casts, transposed or quantised experts, ...): the experts are then fused by
    transformers and packed into a host tier of their own, a second copy in this process."""
    from tritonmoe.loader.hf_model import ExpertMappingError

    try:
        return _mapped_host_store(ckpt, device, dtype, cfg, phases,
                                  pin=device.type == "cuda" and cfg.offload.pin_host_memory)
    except ExpertMappingError as e:
        log.warning("expert offloading of %s: the host tier is a packed copy of the experts (a second copy "
                    "beside the loader's shared memory) because they cannot be served from the shared memory: "
                    "%s", cfg.checkpoint, e)
        return None


def _mapped_host_store(ckpt, device: torch.device, dtype: torch.dtype, cfg: EngineConfig, phases: dict[str, float],
                       *, pin: bool, where: str = "the loader's shared memory", file_backed: bool = False):
    """The offloading host tier as views of a mapped converted checkpoint (``PartsHostStore``: each expert a few
    byte ranges of the mapping, copied into its cache slot part by part); raises ``ExpertMappingError`` where the
    expert tensors are not byte ranges of transformers' fused expert parameters. With ``pin`` the mapping is
    page-locked (``ShmCheckpoint.pin``, once per mapping; a warm pool worker may have done it already) so the
    expert copies run asynchronously, and parts are split at the registration grid (a copy never spans two
    registrations)."""
    from tritonmoe.backend.offload.host_store import PartsHostStore
    from tritonmoe.backend.offload.layout import ExpertLayout
    from tritonmoe.loader.hf_model import ExpertMappingError, expert_sources, experts_modules, meta_model

    with _phase(phases, "expert_map"):
        skeleton = meta_model(ckpt.path, dtype)  # names, shapes and dtypes only
        sources = expert_sources(ckpt, skeleton)
        modules = [m for _, m in experts_modules(skeleton)]
        layout = ExpertLayout.of_experts_module(modules[0])
        if any(ExpertLayout.of_experts_module(m) != layout for m in modules[1:]):
            raise ExpertMappingError("the MoE layers' expert layouts differ")
    split_grid = None
    if pin:
        from tritonmoe.loader.device_copy import DEFAULT_COPY_CHUNK

        if not ckpt.pinned:
            with _phase(phases, "pin"):
                ckpt.pin(DEFAULT_COPY_CHUNK)
        if ckpt.pinned:
            split_grid = _grid_splitter(DEFAULT_COPY_CHUNK)
        else:
            log.warning("could not page-lock the shared memory of %s: expert copies from it will be synchronous",
                        ckpt.path)
    store = PartsHostStore.from_sources(layout, sources, pinned=pin and ckpt.pinned, keepalive=ckpt,
                                        split_grid=split_grid, file_backed=file_backed)
    log.info("expert offloading of %s: the host tier is %s (%d layers x %d experts, "
             "%.1f copies per expert, %.2f GB not copied)", cfg.checkpoint, where, store.num_layers, store.num_experts,
             store.num_parts / (store.num_layers * store.num_experts), store.total_bytes / 1e9)
    return store


def _grid_splitter(chunk: int):
    """Split a uint8 view of a partition mapping where it crosses a multiple of ``chunk`` bytes from the start of
    the partition: ``ShmCheckpoint.pin`` registers the mapping in pieces on that grid."""

    def split(view: torch.Tensor) -> list[torch.Tensor]:
        start = view.data_ptr() - view.untyped_storage().data_ptr()  # offset in its partition
        pieces, pos, end = [], start, start + view.numel()
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            pieces.append(view[pos - start:stop - start])
            pos = stop
        return pieces

    return split
