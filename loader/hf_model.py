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
    read from the shared memory on the host, where an offloading engine packs them into its host tier
    (``tritonmoe.backend.offload.attach_offloading``). On the CPU, weights whose dtype is kept stay views of the
    shared memory (no copy). ``phases`` receives the seconds of "gpu_copy" and "build"."""
    device = torch.device(device)
    experts_device = torch.device(experts_device) if experts_device is not None else device
    phases = phases if phases is not None else {}
    experts = checkpoint.expert_names()
    t = time.perf_counter()
    state_dict = {}
    for target, names in ((device, checkpoint.non_expert_names()), (experts_device, sorted(experts))):
        if target.type == "cpu":
            state_dict.update(checkpoint.state_dict(names))
        else:
            state_dict.update(checkpoint.to_device(target, names))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    phases["gpu_copy"] = time.perf_counter() - t
    t = time.perf_counter()
    # The device_map keeps every weight where its tensor was put above (experts containers on experts_device);
    # modules' own buffers (rotary tables) follow the non-expert weights below.
    device_map = None
    if "cuda" in (device.type, experts_device.type):  # on the CPU, building there is what a device_map would do
        device_map = {"": str(device)}
        if experts_device != device:
            device_map.update({e.module: str(experts_device) for e in checkpoint.index.experts})
    model = build_hf_model(checkpoint.path, state_dict, None, dtype, device_map=device_map)
    del state_dict
    if experts_device == device:
        model = model.to(device)
    else:
        _move_non_experts(model, device)
    phases["build"] = time.perf_counter() - t
    log.info("model from the loader's DRAM cache %s: GPU copy %.3f s, build %.3f s", checkpoint.path,
             phases["gpu_copy"], phases["build"])
    return model


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
