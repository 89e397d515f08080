"""Build a transformers model from a converted checkpoint.

transformers 5 fuses the per-expert checkpoint keys into 3-D expert parameters while loading (its
`conversion_mapping` / `WeightConverter` machinery). Rather than repeat that, we hand our tensors to the model
class's `from_pretrained(None, config=..., state_dict=...)`, which builds the model on the meta device and runs
the very same conversion it runs on safetensors files: the result is the model `from_pretrained(hf_folder)` gives.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .format import CheckpointError
from .reader import load_state_dict


def load_hf_model(converted_dir: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype | str = "auto", *, verify: bool = True, **reader_options):
    """The causal-LM model of ``converted_dir``, its weights read by the tritonmoe reader, on ``device``
    in ``dtype`` ("auto": the checkpoint's own), with the generation config that was converted beside it."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    converted_dir = Path(converted_dir)
    config = AutoConfig.from_pretrained(converted_dir)
    state_dict = load_state_dict(converted_dir, verify=verify, **reader_options)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the Auto class does not accept a None path
    # Built on the CPU and then moved: a device_map would need `accelerate`, which tritonmoe does not depend on.
    model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype,
                                              output_loading_info=True)
    # from_pretrained would only warn and initialise missing weights randomly; a server must not run like that.
    incomplete = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if incomplete:
        raise CheckpointError(f"{converted_dir} does not fit {model_class.__name__}: {len(incomplete)} weights are "
                              f"missing or of the wrong shape, e.g. {incomplete[:3]}")
    model = model.to(device)
    if (converted_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(converted_dir)
    return model
