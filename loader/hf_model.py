"""Build a transformers model from a converted checkpoint: from its folder, or from the loader's DRAM cache.

transformers 5 fuses the per-expert checkpoint keys into 3-D expert parameters while loading (its
`conversion_mapping` / `WeightConverter` machinery). Rather than repeat that, we hand our tensors to the model
class's `from_pretrained(None, config=..., state_dict=...)`, which builds the model on the meta device and runs
the very same conversion it runs on safetensors files: the result is the model `from_pretrained(hf_folder)` gives.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .format import CheckpointError, read_index
from .reader import load_state_dict

log = logging.getLogger("tritonmoe.loader")


def build_hf_model(config_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                   device: str | torch.device | None = "cpu", dtype: torch.dtype | str = "auto",
                   device_map: dict[str, str] | None = None):
    """The causal-LM model described by ``config_dir``'s config.json, its weights taken from ``state_dict`` (HF
    names), moved to ``device`` (None: leave each weight where transformers put it), in ``dtype``.

    ``device_map`` (module prefix -> device) makes transformers place each weight there as it builds the model;
    without one it builds on the CPU, so weights already on a GPU would go to the host and back."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    config_dir = Path(config_dir)
    config = AutoConfig.from_pretrained(config_dir)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the Auto class does not accept a None path
    kwargs = dict(config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True)
    try:
        model, info = model_class.from_pretrained(None, **kwargs, **({"device_map": device_map} if device_map
                                                                     else {}))
    except Exception as e:  # e.g. no `accelerate`, which transformers wants for a device_map
        if not device_map:
            raise
        log.warning("from_pretrained with a device_map failed (%s); building on the CPU and moving", e)
        model, info = model_class.from_pretrained(None, **kwargs)
        device = device or next(iter(device_map.values()))
    # from_pretrained would only warn and initialise missing weights randomly; a server must not run like that.
    incomplete = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if incomplete:
        raise CheckpointError(f"{config_dir} does not fit {model_class.__name__}: {len(incomplete)} weights are "
                              f"missing or of the wrong shape, e.g. {incomplete[:3]}")
    if device is not None:
        model = model.to(device)
    if (config_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(config_dir)
    return model


def load_hf_model(converted_dir: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype | str = "auto", *, verify: bool = True, **reader_options):
    """The causal-LM model of ``converted_dir``, its weights read by the tritonmoe reader, on ``device``
    in ``dtype`` ("auto": the checkpoint's own), with the generation config that was converted beside it."""
    state_dict = load_state_dict(converted_dir, verify=verify, **reader_options)
    # The tensors are views into one buffer per partition. transformers copies the experts when it fuses them,
    # but keeps non-expert views as parameters, which would keep whole partitions (experts included) alive:
    # copy the (small) non-expert tensors out, so the partition buffers are freed once the model is built.
    experts = {n for e in read_index(converted_dir).experts for n in e.tensors}
    state_dict = {n: (t if n in experts else t.clone()) for n, t in state_dict.items()}
    return build_hf_model(converted_dir, state_dict, device, dtype)


def load_hf_model_from_shm(checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto",
                           *, experts_device: str | torch.device | None = None,
                           phases: dict[str, float] | None = None):
    """The model of a :class:`~tritonmoe.loader.client.ShmCheckpoint` (the loader's DRAM copy, mapped).

    Non-expert weights go to ``device`` (on CUDA: pinned in place, chunked, pipelined copies on a side stream);
    routed experts go to ``experts_device`` (default ``device``). With ``experts_device="cpu"`` the experts are
    read from the shared memory on the host, where transformers fuses them and an offloading engine packs them
    into its host tier (``tritonmoe.backend.offload.attach_offloading``). With ``experts_device="meta"`` the
    experts are not read at all: the fused expert parameters are stand-ins of the right shape and dtype that hold
    no memory (one element on ``device``, expanded), for an offloading engine that serves the experts straight from
    the shared memory (:func:`expert_sources`) and drops the stand-ins. On the CPU, weights
    whose dtype is kept stay views of the shared memory (no copy). ``phases`` receives the seconds of "gpu_copy"
    and "build"."""
    device = torch.device(device)
    experts_device = torch.device(experts_device) if experts_device is not None else device
    phases = phases if phases is not None else {}
    experts = checkpoint.expert_names()
    t = time.perf_counter()
    # On a GPU, each routed expert's bytes go straight into its place in the model's fused expert parameters
    # (allocated here), in the same pipeline as the other weights: no second device copy of the experts for
    # transformers to fuse, and half the peak GPU memory. Where the checkpoint does not map onto them byte for
    # byte (transposed experts, casts, fp8 scales), transformers fuses them as before.
    fused = _fused_experts_on(checkpoint, device, dtype) if device.type == "cuda" and experts_device == device \
        and not checkpoint.pinned and checkpoint.loader is None else None
    if fused is not None:
        experts_device = torch.device("meta")  # stand-ins below; the real parameters are swapped in after
    state_dict = {}
    for target, names in ((device, checkpoint.non_expert_names()), (experts_device, sorted(experts))):
        if target.type == "meta":
            continue
        if target.type == "cpu":
            state_dict.update(checkpoint.state_dict(names))
        else:
            state_dict.update(checkpoint.to_device(target, names, into=fused.copies if fused and target == device
                                                   else ()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    phases["gpu_copy"] = time.perf_counter() - t
    t = time.perf_counter()
    # The device_map keeps every weight where its tensor was put above (experts containers on experts_device);
    # modules' own buffers (rotary tables) follow the non-expert weights below.
    device_map = None
    if "cuda" in (device.type, experts_device.type):  # on the CPU, building there is what a device_map would do
        device_map = {"": str(device)}
        if experts_device != device and experts_device.type != "meta":
            device_map.update({e.module: str(experts_device) for e in checkpoint.index.experts})
    if experts_device.type == "meta":
        # Stand-ins for the fused expert parameters under the model's own names: the right shape and dtype, one
        # element expanded (no memory, nothing for transformers to fuse or copy; the offloading engine drops them).
        for name, module in experts_modules(fused.meta if fused is not None else meta_model(checkpoint.path, dtype)):
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() >= 2 and param.shape[0] == module.num_experts:
                    state_dict[f"{name}.{param_name}"] = torch.zeros((), dtype=param.dtype,
                                                                     device=device).expand(param.shape)
    model = build_hf_model(checkpoint.path, state_dict, None, dtype, device_map=device_map)
    del state_dict
    if experts_device == device:
        model = model.to(device)
    else:
        _move_non_experts(model, device)
    if fused is not None:
        for (name, module), params in zip(experts_modules(model), fused.params):
            for param_name, tensor in params.items():
                setattr(module, param_name, torch.nn.Parameter(tensor, requires_grad=False))
    phases["build"] = time.perf_counter() - t
    log.info("model from the loader's DRAM cache %s: GPU copy %.3f s, build %.3f s", checkpoint.path,
             phases["gpu_copy"], phases["build"])
    return model


class FusedExperts(NamedTuple):
    params: list[dict[str, torch.Tensor]]  # per experts container: parameter name -> its tensor (uninitialised)
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # (shared-memory view, byte range of a tensor above)
    meta: torch.nn.Module  # the meta-device model they were planned on


def _fused_experts_on(checkpoint, device: torch.device, dtype) -> FusedExperts | None:
    """The model's fused expert parameters, allocated (uninitialised) on ``device``, and the copies that fill
    them; None (logged) where :func:`expert_sources` refuses the mapping."""
    model = meta_model(checkpoint.path, dtype)
    try:
        sources = expert_sources(checkpoint, model)
    except ExpertMappingError as e:
        log.info("experts of %s fused by transformers after the copy: %s", checkpoint.path, e)
        return None
    params, copies = [], []
    for (_, module), layer in zip(experts_modules(model), sources):
        real = {name: torch.empty(p.shape, dtype=p.dtype, device=device)
                for name, p in module.named_parameters(recurse=False)
                if p.dim() >= 2 and p.shape[0] == module.num_experts}
        flat = {name: t.view(-1).view(torch.uint8) for name, t in real.items()}
        for expert, parts in enumerate(layer):
            for name, offset, view in parts:
                start = expert * (flat[name].numel() // module.num_experts) + offset
                copies.append((view, flat[name][start:start + view.numel()]))
        params.append(real)
    return FusedExperts(params, copies, model)


# ---- routed experts served from the shared memory (offloading without a second host copy) ------------------------
class ExpertMappingError(ValueError):
    """The checkpoint's per-expert tensors do not map onto byte ranges of the model's fused expert parameters."""


def meta_model(config_dir: str | os.PathLike, dtype: torch.dtype | str = "auto"):
    """The causal-LM model of ``config_dir``'s config on the meta device: names, shapes and dtypes, no memory."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    if dtype == "auto" or dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._from_config(config, dtype=dtype)


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """transformers' fused experts containers (``ExpertsInterface``), in module order: the offloading engine's
    MoE layers, in the same order."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "has_gate") and hasattr(m, "is_transposed") and hasattr(m, "num_experts")]


def expert_sources(checkpoint, model: torch.nn.Module) -> list[list[list[tuple[str, int, torch.Tensor]]]]:
    """Where each byte of the model's fused expert parameters is in the loader's shared memory, without reading it.

    Returns, per experts container of ``model`` (the order of :func:`experts_modules`), per expert, the list of
    ``(parameter name, byte offset in that parameter's per-expert slice, uint8 view of the mapping)``: Mixtral's
    ``w1`` is ``gate_up_proj`` rows ``[0:F]`` (offset 0), ``w3`` rows ``[F:2F]`` (offset ``F*H*itemsize``), ``w2``
    is ``down_proj``. ``model`` may be on the meta device (only names, shapes and dtypes are read).

    The mapping is transformers' own conversion for this model (``get_model_conversion_mapping``: renamings, then
    a ``WeightConverter`` per fused parameter), accepted only where it is a byte-range copy: the converter merges
    the experts along dim 0 (``MergeModulelist(dim=0)``), optionally concatenating its sources along the expert
    slice's first dimension (``Concatenate(dim=1)``), every source tensor is contiguous, of the parameter's dtype,
    and of its slice's trailing shape, and together they fill each slice exactly. Anything else (transposed
    experts, dtype casts, fp8 scales, quantizers, other operations, tensors the conversion does not place) raises
    :class:`ExpertMappingError` saying why: the caller then falls back to transformers' fused copy."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                                 rename_source_key)

    from .format import contiguous_stride

    modules = experts_modules(model)
    if not modules:
        raise ExpertMappingError(f"{type(model).__name__} has no fused experts containers")
    position = {name: i for i, (name, _) in enumerate(modules)}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = dict(model.state_dict(keep_vars=True))
    out: list[list[list[tuple[str, int, torch.Tensor]]]] = [
        [[] for _ in range(m.num_experts)] for _, m in modules]
    filled: dict[tuple[int, int, str], int] = {}
    for entry in checkpoint.index.experts:
        for name in entry.tensors:
            target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, meta_state)
            if pattern is None:
                raise ExpertMappingError(f"checkpoint tensor {name} is not merged into a fused expert parameter by "
                                         f"transformers' conversion (it would load as {target})")
            converter = next(c for c in converters if pattern in c.source_patterns)
            ops = [type(op) for op in converter.operations]
            dims = [getattr(op, "dim", None) for op in converter.operations]
            if converter.quantization_operation is not None or converter.distributed_operation is not None or \
                    (ops, dims) not in (([MergeModulelist], [0]), ([MergeModulelist, Concatenate], [0, 1])) or \
                    (len(converter.source_patterns) > 1 and Concatenate not in ops):
                raise ExpertMappingError(f"{name} goes through {converter.operations} (quantizer "
                                         f"{converter.quantization_operation}), not a plain merge of experts")
            module_name, _, param_name = target.rpartition(".")
            if module_name not in position:
                raise ExpertMappingError(f"{name} loads as {target}, which is not a parameter of an experts container")
            layer, module = position[module_name], modules[position[module_name]][1]
            param = getattr(module, param_name, None)
            if param is None or param.dim() < 2 or param.shape[0] != module.num_experts:
                raise ExpertMappingError(f"{name} loads into {target}, which is not a per-expert parameter")
            if not 0 <= entry.expert < module.num_experts:
                raise ExpertMappingError(f"{name}: expert {entry.expert} outside {module_name}'s {module.num_experts}")
            if getattr(module, "is_transposed", False):
                raise ExpertMappingError(f"{module_name} keeps its experts transposed")
            t = checkpoint.index.tensors[name]
            dtype = getattr(torch, t.dtype)
            slice_shape = list(param.shape[1:])
            if dtype != param.dtype:
                raise ExpertMappingError(f"{name} is {t.dtype} but {target} is {str(param.dtype).removeprefix('torch.')}"
                                         " (a dtype cast is a copy)")
            if t.stride != contiguous_stride(t.shape) or list(t.shape[1:]) != slice_shape[1:] or not t.shape:
                raise ExpertMappingError(f"{name} of shape {t.shape} (stride {t.stride}) is not a row block of "
                                         f"{target}'s per-expert slice {slice_shape}")
            # Concatenate keeps the converter's order of source patterns: rows of the earlier patterns come first
            rows_before = 0
            for earlier in converter.source_patterns[:converter.source_patterns.index(pattern)]:
                sibling = _sibling(checkpoint, entry, name, pattern, earlier)
                if sibling is None:
                    raise ExpertMappingError(f"{name}: no tensor of pattern {earlier!r} beside it in expert "
                                             f"{entry.expert} of {entry.module}")
                rows_before += checkpoint.index.tensors[sibling].shape[0]
            row_bytes = param.dtype.itemsize * int(torch.Size(slice_shape[1:]).numel())
            out[layer][entry.expert].append((param_name, rows_before * row_bytes, checkpoint.raw(t)))
            key = (layer, entry.expert, param_name)
            filled[key] = filled.get(key, 0) + t.bytes
    _fused_sources(checkpoint, modules, position, renamings, converters, model.base_model_prefix, meta_state, out,
                   filled)
    for layer, (module_name, module) in enumerate(modules):
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() < 2 or param.shape[0] != module.num_experts:
                continue
            want = param[0].numel() * param.dtype.itemsize
            for expert in range(module.num_experts):
                got = filled.get((layer, expert, param_name), 0)
                if got != want:
                    raise ExpertMappingError(f"{module_name}.{param_name} of expert {expert}: the checkpoint's "
                                             f"tensors give {got} of its {want} bytes")
    return out


def _fused_sources(checkpoint, modules, position, renamings, converters, prefix, meta_state, out, filled) -> None:
    """Checkpoint tensors that already *are* a fused expert parameter (GPT-OSS's format: ``experts.gate_up_proj``
    ``[E, ...]``, loaded as is, no conversion): expert ``e`` is the ``e``-th equal byte range of the tensor. Only
    exactly matching shape, dtype and a contiguous layout count; anything else is left for the byte check to
    refuse. Adds to ``out`` / ``filled`` as :func:`expert_sources` does."""
    from transformers.core_model_loading import rename_source_key

    from .format import contiguous_stride

    per_expert_names = {name for entry in checkpoint.index.experts for name in entry.tensors}
    for name, t in checkpoint.index.tensors.items():
        if name in per_expert_names:
            continue
        target, pattern = rename_source_key(name, renamings, converters, prefix, meta_state)
        module_name, _, param_name = target.rpartition(".")
        if pattern is not None or module_name not in position:
            continue
        layer, module = position[module_name], modules[position[module_name]][1]
        param = getattr(module, param_name, None)
        if param is None or param.dim() < 2 or param.shape[0] != module.num_experts:
            continue
        if list(t.shape) != list(param.shape) or getattr(torch, t.dtype) != param.dtype or \
                t.stride != contiguous_stride(t.shape):
            raise ExpertMappingError(f"{name} {t.dtype}{list(t.shape)} is not {target}'s fused layout "
                                     f"{str(param.dtype).removeprefix('torch.')}{list(param.shape)}")
        raw = checkpoint.raw(t)
        per = raw.numel() // module.num_experts
        for expert in range(module.num_experts):
            out[layer][expert].append((param_name, 0, raw[expert * per:(expert + 1) * per]))
            key = (layer, expert, param_name)
            filled[key] = filled.get(key, 0) + per


def _sibling(checkpoint, entry, name: str, pattern: str, other_pattern: str) -> str | None:
    """The tensor of ``entry`` (an expert) that ``other_pattern`` names where ``pattern`` names ``name``."""
    a, b = pattern.split("*.")[-1], other_pattern.split("*.")[-1]  # "w1.weight", "w3.weight"
    if not name.endswith(a):
        return None
    candidate = name[:len(name) - len(a)] + b
    return candidate if candidate in entry.tensors else None


def _move_non_experts(model: torch.nn.Module, device: torch.device) -> None:
    """Move everything but fused expert parameters (``module.num_experts`` leading dimension) to ``device``."""
    for module in model.modules():
        is_experts = hasattr(module, "num_experts") and hasattr(module, "has_gate")
        for name, param in list(module.named_parameters(recurse=False)):
            if is_experts and param.dim() >= 2 and param.shape[0] == module.num_experts:
                continue
            if param.device != device:
                param.data = param.data.to(device)  # in place: tied weights stay one Parameter
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.device != device:
                module._buffers[name] = buf.to(device)
