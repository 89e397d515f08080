"""Sampling parameters (validated from a request's JSON) and a per-row sampler for a batch of sequences."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch


class RequestError(ValueError):
    """A request is malformed; the message names the field and is sent back to the client as is."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# key -> (accepted Python types, description used in errors)
_KEYS = {
    "max_tokens": ((int,), "an integer >= 1"),
    "temperature": ((int, float), "a number >= 0"),
    "top_p": ((int, float), "a number in (0, 1]"),
    "top_k": ((int,), "an integer >= 0 (0 disables it)"),
    "seed": ((int,), "an integer"),
    "stop": ((str, list), "a string or a list of strings"),
    "min_tokens": ((int,), "an integer >= 0"),
    "ignore_eos": ((bool,), "true or false"),
}
SAMPLING_KEYS = frozenset(_KEYS)


def _coerce(key: str, value):
    """Request parameters from HTTP/gRPC arrive typed, but perf_analyzer and some clients send numbers as strings."""
    types, what = _KEYS[key]
    if isinstance(value, bool) and bool not in types:
        raise RequestError(f"sampling parameter '{key}' must be {what}, got {value!r}")
    if isinstance(value, types):
        return value
    if isinstance(value, str) and str not in types:
        text = value.strip().lower()
        try:
            if bool in types and text in ("true", "false"):
                return text == "true"
            if int in types and float not in types:
                return int(text)
            if float in types:
                return float(text)
        except ValueError:
            pass
    if isinstance(value, float) and int in types and float not in types and value.is_integer():
        return int(value)
    raise RequestError(f"sampling parameter '{key}' must be {what}, got {value!r}")


def parse_sampling(values: dict, *, max_model_len: int, default_max_tokens: int = 16) -> SamplingParams:
    """Validate a dict of sampling keys. Unknown keys are errors: a typo must not silently change nothing."""
    unknown = sorted(set(values) - SAMPLING_KEYS)
    if unknown:
        raise RequestError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                           f"accepted: {', '.join(sorted(SAMPLING_KEYS))}")
    v = {k: _coerce(k, x) for k, x in values.items() if x is not None}
    max_tokens = v.get("max_tokens", default_max_tokens)
    if max_tokens < 1:
        raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}")
    if max_tokens >= max_model_len:
        raise RequestError(f"'max_tokens' ({max_tokens}) must be smaller than the model's context ({max_model_len})")
    temperature = float(v.get("temperature", 0.0))
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"'temperature' must be a finite number >= 0, got {temperature}")
    top_p = float(v.get("top_p", 1.0))
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p}")
    top_k = v.get("top_k", 0)
    if top_k < 0:
        raise RequestError(f"'top_k' must be >= 0, got {top_k}")
    stop = v.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings")
    min_tokens = v.get("min_tokens", 0)
    if not 0 <= min_tokens <= max_tokens:
        raise RequestError(f"'min_tokens' must be in 0..max_tokens ({max_tokens}), got {min_tokens}")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=v.get("seed"), stop=stop, min_tokens=min_tokens,
                          ignore_eos=v.get("ignore_eos", False))


def request_seed(params: SamplingParams) -> int | None:
    """The seed a sampled request draws from; unseeded requests get a random one (greedy ones need none)."""
    if params.greedy:
        return None
    return params.seed if params.seed is not None else random.getrandbits(63)


def token_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A generator for output token ``index`` of a request, derived from (seed, index) alone.

    Stateless on purpose: a seeded request samples the same tokens whatever else is in its batch, and a stream
    resumed on another server after ``index`` tokens (live migration) continues exactly where it left off.
    """
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (1 << 63))
    return gen


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of float32 logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
