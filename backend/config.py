"""The model's settings, parsed once from ``config.pbtxt`` ``parameters`` and validated with clear messages.

Booleans are spelled ``true`` or ``false`` (any case) and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Keys Triton's Python backend reads itself; we accept and ignore them.
TRITON_KEYS = frozenset({"FORCE_CPU_ONLY_INPUT_TENSORS", "EXECUTION_ENV_PATH"})


class ConfigError(ValueError):
    pass


def parse_bool(key: str, value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise ConfigError(f"parameter '{key}' must be true or false, got {value!r}")
    return text == "true"


def parse_int(key: str, value: str, minimum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"parameter '{key}' must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"parameter '{key}' must be >= {minimum}, got {number}")
    return number


def parse_choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    text = value.strip()
    if text not in choices:
        raise ConfigError(f"parameter '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return text


# transformers' ExpertsInterface kernels offered for resident experts ("auto": grouped_mm for bf16 on Hopper or
# newer, otherwise transformers' default); offloaded experts always run tritonmoe's own.
EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm")


def models_home() -> Path:
    from tritonmoe.tools.tritonserver import tritonmoe_home

    return tritonmoe_home() / "models"


def resolve_checkpoint(value: str, model_dir: str | None = None) -> Path:
    """Environment variables are expanded; a relative path is looked up beside the model's folder, then under
    ``$TRITONMOE_HOME/models`` (where ``tritonmoe-serve`` builds its default model)."""
    path = Path(os.path.expandvars(value)).expanduser()
    if path.is_absolute():
        return path
    if model_dir and (Path(model_dir) / path).exists():
        return Path(model_dir) / path
    return models_home() / path


def engine_pool_socket(params: dict[str, str]) -> str | None:
    """``engine_pool``: the Unix socket of this host's warm engine pool (``tritonmoe-engine-pool --socket PATH``);
    unset or empty: the engine runs in the model's own stub. Environment variables and ``~`` are expanded."""
    value = params.get("engine_pool", "").strip()
    if not value:
        return None
    path = os.path.expanduser(os.path.expandvars(value))
    if not os.path.isabs(path):
        raise ConfigError(f"parameter 'engine_pool' must be the absolute path of the engine pool's socket "
                          f"(tritonmoe-engine-pool --socket PATH), got {value!r}")
    return path


def offload_config(params: dict[str, str]):
    """Expert offloading is on when ``expert_cache_budget`` is set; its other keys alone are a mistake."""
    from tritonmoe.backend.offload.config import PARAMETER_KEYS, OffloadConfig

    given = sorted(k for k in params if k in PARAMETER_KEYS.values())
    if not given:
        return None
    if "expert_cache_budget" not in given:
        raise ConfigError(f"parameter(s) {', '.join(map(repr, given))} need 'expert_cache_budget', which turns "
                          "expert offloading on (bytes such as '2GiB', or a share of the routed experts such as '25%')")
    try:
        return OffloadConfig.from_parameters({k: params[k] for k in given})
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class EngineConfig:
    checkpoint: Path
    dtype: str = "auto"
    max_num_seqs: int = 8
    max_model_len: int | None = None
    default_max_tokens: int = 16
    report_metrics: bool = True
    experts_implementation: str = "auto"
    offload: object | None = None  # OffloadConfig when experts are offloaded
    loader_url: str | None = None  # load through the loader service there; checkpoint may be a registered name
    engine_pool: str | None = None  # run the engine in a warm worker of the engine pool at this socket

    @classmethod
    def from_parameters(cls, params: dict[str, str], model_dir: str | None = None) -> "EngineConfig":
        from tritonmoe.backend.offload.config import PARAMETER_KEYS

        known = {"checkpoint", "dtype", "max_num_seqs", "max_model_len", "default_max_tokens", "report_metrics",
                 "loader_url", "experts_implementation", "engine_pool", *PARAMETER_KEYS.values()}
        unknown = sorted(set(params) - known - TRITON_KEYS)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        if not params.get("checkpoint", "").strip():
            raise ConfigError("parameter 'checkpoint' is required: the folder of a Hugging Face checkpoint")
        dtype = params.get("dtype", "auto").strip()
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"parameter 'dtype' must be auto, float32, bfloat16 or float16, got {dtype!r}")
        loader_url = params.get("loader_url", "").strip() or None
        checkpoint = resolve_checkpoint(params["checkpoint"].strip(), model_dir)
        if loader_url and not checkpoint.exists() and "/" not in params["checkpoint"].strip():
            checkpoint = Path(params["checkpoint"].strip())  # a model name registered at the loader
        return cls(
            checkpoint=checkpoint,
            dtype=dtype,
            max_num_seqs=parse_int("max_num_seqs", params.get("max_num_seqs", "8"), 1),
            max_model_len=(parse_int("max_model_len", params["max_model_len"], 2)
                           if params.get("max_model_len", "").strip() else None),
            default_max_tokens=parse_int("default_max_tokens", params.get("default_max_tokens", "16"), 1),
            report_metrics=parse_bool("report_metrics", params.get("report_metrics", "true")),
            experts_implementation=parse_choice("experts_implementation", params.get("experts_implementation", "auto"),
                                                EXPERTS_IMPLEMENTATIONS),
            offload=offload_config(params),
            loader_url=loader_url,
            engine_pool=engine_pool_socket(params),
        )


def parameters_from_model_config(model_config: dict) -> dict[str, str]:
    """``{"k": {"string_value": "v"}}`` as Triton hands it over -> ``{"k": "v"}``."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
