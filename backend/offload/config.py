"""Offloading settings, and their parsing from a Triton ``config.pbtxt`` ``parameters`` map.

Every key of this module starts with ``expert_`` or ``eamc_``; :meth:`OffloadConfig.from_parameters` reads only those
(the model's other parameters belong to the engine) and rejects unknown ones, so a misspelt key fails loudly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

EVICTION_POLICIES = ("lru", "lfu", "activation", "auto")
ACTIVATION_EVICTION = ("activation", "auto")  # the policies that read the activation prediction
HOST_TIERS = ("auto", "shared", "packed", "disk")
PREFETCH_POLICIES = ("none", "activation", "lookahead")
DEFAULT_FREQUENCY_WEIGHT = 2.0
DEFAULT_FREQUENCY_HALF_LIFE = 64.0

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class ExpertBudget:
    """How much device memory the expert cache may take: a byte count, or a fraction of all routed experts."""

    nbytes: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str | int) -> "ExpertBudget":
        """``"25%"`` (of all routed experts), ``"64MiB"``, ``"1.5GB"``, ``"1048576"`` or an int (bytes)."""
        if isinstance(text, int) and not isinstance(text, bool):
            if text <= 0:
                raise ValueError(f"budget must be positive, got {text}")
            return cls(nbytes=text)
        s = str(text).strip().lower().replace(" ", "")
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ValueError(f"bad percentage {text!r}") from None
            if not 0 < pct <= 100:
                raise ValueError(f"percentage must be in (0, 100], got {text!r}")
            return cls(fraction=pct / 100)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", s)
        if not m or m.group(2) not in _UNITS or (m.group(2) == "" and "." in m.group(1)):
            raise ValueError(f"bad budget {text!r}: give a percentage ('25%') or a size ('64MiB', '2GB', bytes)")
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2)])
        if nbytes <= 0:
            raise ValueError(f"budget must be positive, got {text!r}")
        return cls(nbytes=nbytes)

    def slots(self, slot_bytes: int, total_experts: int) -> int:
        """Cache slots this budget buys: at least one, at most one per routed expert (more would never be used)."""
        # the epsilon keeps "1/E of all experts" at exactly one per layer despite float rounding (0.1 * 30 < 3)
        n = int(self.fraction * total_experts + 1e-9) if self.fraction is not None else self.nbytes // slot_bytes
        if n < 1:
            what = f"{self.fraction:.4%} of {total_experts} experts" if self.fraction is not None else f"{self.nbytes} B"
            raise ValueError(f"expert cache budget ({what}) holds no expert; one expert slot takes {slot_bytes} B")
        return min(n, total_experts)


@dataclass(frozen=True)
class OffloadConfig:
    """Knobs of expert offloading. Field name -> Triton parameter key in ``PARAMETER_KEYS``."""

    cache_budget: str = "25%"
    # "auto": LRU for a lone sequence's decode step, activation-aware eviction otherwise (eviction.BatchAwareEviction)
    eviction: str = "auto"
    # MoE-Infinity's (1 - i/L) factor in the activation eviction score, which keeps early layers' experts longest;
    # off by default: on the H200 it cost batch 8 7% TPOT and gained nothing at batch 1 (docs/offloading_log.md)
    eviction_depth_factor: bool = False
    # weight of each layer's expert-use frequencies beside the prediction in the activation eviction score (0: the
    # paper's score alone); 2 measured best in the decision replay (docs/offloading_log.md, "A frequency prior")
    eviction_frequency_weight: float = DEFAULT_FREQUENCY_WEIGHT
    # after how many of a layer's forwards a use counts half in the frequency prior (0: never forgotten); 64
    # followed a shift of the request mix ~2% better in the decision replay and moved a steady mix by < 0.2%
    # (docs/offloading_log.md, "A frequency prior that forgets")
    eviction_frequency_half_life: float = DEFAULT_FREQUENCY_HALF_LIFE
    prefetch: str = "lookahead"
    eamc_capacity: int = 120
    eamc_path: str | None = None
    eamc_top_matches: int = 4
    pin_host_memory: bool = True
    # through the loader: "shared" serves the host tier from the loader's shared memory (no second copy), "packed"
    # copies the experts into a host tier of this process, "auto" is shared on the CPU and packed on a GPU -- the
    # shared tier page-locks the whole DRAM copy in the backend process: GPU-tested with small models only.
    # "disk" (a local converted checkpoint, no loader): the experts are read from the checkpoint's files through a
    # memory map, the OS page cache their DRAM tier -- for models whose experts do not fit in host memory
    host_tier: str = "auto"
    # a JSON-lines file the engine appends the expert cache's per-step, per-layer activity to (trace_file.py)
    trace_path: str | None = None

    def __post_init__(self):
        ExpertBudget.parse(self.cache_budget)
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}")
        if self.eviction_depth_factor and self.eviction not in ACTIVATION_EVICTION:
            raise ValueError(f"expert_eviction_depth_factor applies to expert_eviction 'activation' and 'auto' only, "
                             f"not {self.eviction!r}")
        for name, default in (("eviction_frequency_weight", DEFAULT_FREQUENCY_WEIGHT),
                              ("eviction_frequency_half_life", DEFAULT_FREQUENCY_HALF_LIFE)):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            if value != default and self.eviction not in ACTIVATION_EVICTION:
                raise ValueError(f"expert_{name} applies to expert_eviction 'activation' and 'auto' only, not "
                                 f"{self.eviction!r}")
        if self.prefetch not in PREFETCH_POLICIES:
            raise ValueError(f"prefetch must be one of {', '.join(PREFETCH_POLICIES)}, got {self.prefetch!r}")
        if self.eamc_capacity < 1:
            raise ValueError(f"eamc_capacity must be at least 1, got {self.eamc_capacity}")
        if self.eamc_top_matches < 1:
            raise ValueError(f"eamc_top_matches must be at least 1, got {self.eamc_top_matches}")
        if self.host_tier not in HOST_TIERS:
            raise ValueError(f"host_tier must be one of {', '.join(HOST_TIERS)}, got {self.host_tier!r}")
        if self.trace_path is not None:
            trace = Path(self.trace_path)
            if trace.is_dir():
                raise ValueError(f"{self.trace_path!r} is a directory; give a file to append the trace to")
            if not trace.parent.is_dir():
                raise ValueError(f"the folder of {self.trace_path!r} does not exist")

    @property
    def budget(self) -> ExpertBudget:
        return ExpertBudget.parse(self.cache_budget)

    @property
    def uses_activation_prediction(self) -> bool:
        """Whether any policy needs the EAM tracer and the EAMC matcher."""
        return self.eviction in ACTIVATION_EVICTION or self.prefetch == "activation"

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "OffloadConfig":
        """Build from Triton model parameters (string values). Keys of other components are ignored."""
        by_key = {key: name for name, key in PARAMETER_KEYS.items()}
        kwargs = {}
        for key, raw in params.items():
            if not key.startswith(("expert_", "eamc_")):
                continue
            if key not in by_key:
                raise ValueError(f"unknown offloading parameter {key!r}; known: {', '.join(sorted(by_key))}")
            name = by_key[key]
            try:
                kwargs[name] = _convert(name, str(raw).strip())
                cls(**{name: kwargs[name]})  # validate this key alone, so the error can name it
            except ValueError as e:
                raise ValueError(f"parameter {key!r}: {e}") from None
        return cls(**kwargs)


PARAMETER_KEYS = {
    "cache_budget": "expert_cache_budget",
    "eviction": "expert_eviction",
    "eviction_depth_factor": "expert_eviction_depth_factor",
    "eviction_frequency_weight": "expert_eviction_frequency_weight",
    "eviction_frequency_half_life": "expert_eviction_frequency_half_life",
    "prefetch": "expert_prefetch",
    "eamc_capacity": "eamc_capacity",
    "eamc_path": "eamc_path",
    "eamc_top_matches": "eamc_top_matches",
    "pin_host_memory": "expert_pin_host_memory",
    "host_tier": "expert_host_tier",
    "trace_path": "expert_trace_path",
}
assert set(PARAMETER_KEYS) == {f.name for f in fields(OffloadConfig)}


def _convert(name: str, raw: str):
    if name in ("eviction_frequency_weight", "eviction_frequency_half_life"):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if name in ("eamc_capacity", "eamc_top_matches"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if name in ("pin_host_memory", "eviction_depth_factor"):
        if raw.lower() not in ("true", "false"):
            raise ValueError(f'expected "true" or "false", got {raw!r}')
        return raw.lower() == "true"
    if name in ("eamc_path", "trace_path"):
        return raw or None
    return raw if name == "cache_budget" else raw.lower()
