"""Which cached expert to evict. Keys are ``(moe_layer, expert)``.

The cache hands each policy the evictable experts as arrays (their layers, experts and last-use ticks), and every
policy breaks its ties by recency: among equals, the least recently used goes. LRU is "the lowest tick".
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Key = tuple[int, int]


def _least_recent_of_lowest(values: np.ndarray, ticks: np.ndarray) -> int:
    """Index of the lowest value; among equal lowest values, the one with the lowest tick."""
    ties = np.flatnonzero(values == values.min())
    return int(ties[np.argmin(ticks[ties])]) if len(ties) > 1 else int(ties[0])


class EvictionPolicy(Protocol):
    def on_use(self, key: Key) -> None:
        """An expert was used by the computation (a hit or a demand fetch; not a prefetch)."""

    def victim(self, layers: np.ndarray, experts: np.ndarray, ticks: np.ndarray) -> int:
        """Index of the expert to evict among the candidates ``(layers[i], experts[i])`` (non-empty);
        ``ticks[i]``: its last use, higher = more recent."""

    def admits(self, incoming: Key, victim: Key) -> bool:
        """Whether a prefetch of ``incoming`` is worth evicting ``victim``."""


class LRUEviction:
    def on_use(self, key: Key) -> None:
        pass

    def victim(self, layers: np.ndarray, experts: np.ndarray, ticks: np.ndarray) -> int:
        return int(np.argmin(ticks))

    def admits(self, incoming: Key, victim: Key) -> bool:
        return True


class LFUEviction:
    """Fewest uses first. Counts belong to the expert and survive its eviction, as MoE-Infinity's visit counts do."""

    def __init__(self):
        self.uses = np.zeros((0, 0), dtype=np.int64)  # [layer, expert], grown on demand

    def on_use(self, key: Key) -> None:
        layer, expert = key
        if layer >= self.uses.shape[0] or expert >= self.uses.shape[1]:
            grown = np.zeros((max(layer + 1, self.uses.shape[0]), max(expert + 1, self.uses.shape[1])), np.int64)
            grown[:self.uses.shape[0], :self.uses.shape[1]] = self.uses
            self.uses = grown
        self.uses[layer, expert] += 1

    def count(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        inside = (layers < self.uses.shape[0]) & (experts < self.uses.shape[1])
        out = np.zeros(len(layers), dtype=np.int64)
        out[inside] = self.uses[layers[inside], experts[inside]]
        return out

    def victim(self, layers: np.ndarray, experts: np.ndarray, ticks: np.ndarray) -> int:
        return _least_recent_of_lowest(self.count(layers, experts), ticks)

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

    def scores(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        p = self._predictor.prediction
        num_layers, num_experts = p.shape
        # eps on every cell keeps the score defined (and uniform within a layer) when a layer has no prediction
        row_sum = p.sum(axis=1) + num_experts * self.EPS
        return (p[layers, experts] + self.EPS) / row_sum[layers] * (1.0 - layers / num_layers)

    def victim(self, layers: np.ndarray, experts: np.ndarray, ticks: np.ndarray) -> int:
        return _least_recent_of_lowest(self.scores(layers, experts), ticks)

    def admits(self, incoming: Key, victim: Key) -> bool:
        s_in, s_victim = self.scores(np.array([incoming[0], victim[0]]), np.array([incoming[1], victim[1]]))
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
