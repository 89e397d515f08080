"""Which cached expert to evict. Keys are ``(moe_layer, expert)``.

The cache hands each policy the evictable keys in least-recently-used order, so every policy breaks its ties by
recency and LRU is simply "the first one".
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import numpy as np

Key = tuple[int, int]


class EvictionPolicy(Protocol):
    def on_use(self, key: Key) -> None:
        """An expert was used by the computation (a hit or a demand fetch; not a prefetch)."""

    def victim(self, candidates: list[Key]) -> Key:
        """The key to evict among ``candidates`` (non-empty, least recently used first)."""

    def admits(self, incoming: Key, victim: Key) -> bool:
        """Whether a prefetch of ``incoming`` is worth evicting ``victim``."""


class LRUEviction:
    def on_use(self, key: Key) -> None:
        pass

    def victim(self, candidates: list[Key]) -> Key:
        return candidates[0]

    def admits(self, incoming: Key, victim: Key) -> bool:
        return True


class LFUEviction:
    """Fewest uses first. Counts belong to the expert and survive its eviction, as MoE-Infinity's visit counts do."""

    def __init__(self):
        self.uses: Counter[Key] = Counter()

    def on_use(self, key: Key) -> None:
        self.uses[key] += 1

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=self.uses.__getitem__)  # min keeps the first of equals: the LRU one

    def admits(self, incoming: Key, victim: Key) -> bool:
        return True


class ActivationAwareEviction:
    """MoE-Infinity's rule: evict the lowest ``(p[i][e] + eps) * (1 - i/L) / sum_e p[i][e]``.

    ``p`` is the predictor's current expert-activation prediction (``prediction`` attribute, ``[L, E]``);
    the ``(1 - i/L)`` factor keeps early layers longest, since prefetching cannot hide their misses. A prefetch
    is admitted only over a victim of lower score, so predictions never evict what they rank higher."""

    EPS = 1e-6

    def __init__(self, predictor):
        self._predictor = predictor

    def on_use(self, key: Key) -> None:
        pass

    def scores(self, keys: list[Key]) -> np.ndarray:
        p = self._predictor.prediction
        num_layers, num_experts = p.shape
        layers = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
        experts = np.fromiter((k[1] for k in keys), dtype=np.int64, count=len(keys))
        # eps on every cell keeps the score defined (and uniform within a layer) when a layer has no prediction
        row_sum = p.sum(axis=1) + num_experts * self.EPS
        return (p[layers, experts] + self.EPS) / row_sum[layers] * (1.0 - layers / num_layers)

    def victim(self, candidates: list[Key]) -> Key:
        return candidates[int(np.argmin(self.scores(candidates)))]  # argmin keeps the first of equals

    def admits(self, incoming: Key, victim: Key) -> bool:
        s_in, s_victim = self.scores([incoming, victim])
        return bool(s_in > s_victim)


def make_eviction_policy(name: str, predictor=None) -> EvictionPolicy:
    if name == "lru":
        return LRUEviction()
    if name == "lfu":
        return LFUEviction()
    if name == "activation":
        if predictor is None:
            raise ValueError("activation-aware eviction needs the activation predictor")
        return ActivationAwareEviction(predictor)
    raise ValueError(f"unknown eviction policy {name!r}")
