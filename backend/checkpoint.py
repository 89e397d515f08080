"""Load a model and its tokenizer from a Hugging Face checkpoint folder, with errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    pass


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device, config_dtype) -> torch.dtype:
    """``auto``: the checkpoint's dtype on a GPU; float32 on the CPU, where half-precision matmuls are slow."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    if isinstance(config_dtype, str):
        return DTYPES.get(config_dtype, torch.bfloat16)
    return config_dtype if isinstance(config_dtype, torch.dtype) else torch.bfloat16


def check_folder(path: Path, weights_glob: str = "*.safetensors") -> dict:
    """Fail early and clearly on a missing or obviously broken checkpoint folder; return its config."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"checkpoint folder {path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    if not any(path.glob(weights_glob)):
        raise CheckpointError(f"checkpoint folder {path} has no {weights_glob} weights")
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise CheckpointError(f"checkpoint folder {path} has no tokenizer (tokenizer.json or tokenizer.model)")
    return config


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types here
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e


def load_model(path: Path, device: torch.device, dtype: str = "auto", experts_implementation: str | None = None):
    """The transformers model on ``device``, in eval mode. Truncated or corrupt weights raise CheckpointError."""
    from transformers import AutoModelForCausalLM

    config = check_folder(path)
    torch_dtype = resolve_dtype(dtype, device, config.get("dtype", config.get("torch_dtype")))
    kwargs = {"dtype": torch_dtype}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise CheckpointError(f"cannot load the model weights from {path}: {type(e).__name__}: {e}") from e
    return model.to(device).eval()
