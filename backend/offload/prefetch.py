"""What to prefetch. After each MoE layer's routing, the policy names the experts of coming layers to load, in
priority order; that list replaces the queue of not-yet-issued prefetches (a new prediction makes the old one stale).
The :class:`PrefetchQueue` issues them a few at a time, so on-demand fetches never queue behind all of them."""

from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np
import torch

from .cache import ExpertCache
from .eam import ActivationPredictor
from .eviction import Key


class PrefetchPolicy(Protocol):
    def plan(self, layer: int, hidden_states: torch.Tensor) -> list[Key]:
        """Experts to prefetch once MoE layer ``layer`` has routed ``hidden_states``, most urgent first."""


class NoPrefetch:
    """On-demand fetching only."""

    def plan(self, layer: int, hidden_states: torch.Tensor) -> list[Key]:
        return []


class ActivationPrefetch:
    """MoE-Infinity: the EAMC-matched prediction, layer-proximity weighted, over all coming layers.

    ``resident`` (``[L, E]`` bool, the cache's live mask) leaves out what is already there, and ``limit`` keeps
    the head of the order only: a layer issues at most a window or two of prefetches before the next layer
    replaces the plan, so ordering thousands of experts (and building their keys) every layer would be waste."""

    def __init__(self, predictor: ActivationPredictor, resident: np.ndarray | None = None, limit: int | None = None):
        self._predictor = predictor
        self._resident = resident
        self._limit = limit

    def plan(self, layer: int, hidden_states: torch.Tensor) -> list[Key]:
        return self._predictor.prefetch_order(layer, exclude=self._resident, limit=self._limit)


class RouterLookaheadPrefetch:
    """Baseline: apply the next MoE layer's router to this layer's hidden states and prefetch what it picks,
    most-picked first. ``routers[i]`` is MoE layer ``i``'s router module, returning ``(..., top_k_index)``."""

    def __init__(self, routers: list[torch.nn.Module]):
        self._routers = routers

    @torch.no_grad()
    def plan(self, layer: int, hidden_states: torch.Tensor) -> list[Key]:
        if layer + 1 >= len(self._routers):
            return []
        # .forward, not __call__: the router's hooks (e.g. router-logit capture) must not see this extra call
        top_k_index = self._routers[layer + 1].forward(hidden_states)[-1]
        # counted where the routing is (one small read-back, not a Python list of every pick)
        picks = torch.bincount(top_k_index.reshape(-1)).cpu().numpy()
        experts = np.flatnonzero(picks)
        experts = experts[np.argsort(-picks[experts], kind="stable")]  # most picked first; ties by expert id
        return [(layer + 1, int(e)) for e in experts]


class PrefetchQueue:
    """Prefetches waiting to be issued, most urgent first, with at most ``window`` in flight at a time."""

    def __init__(self, cache: ExpertCache, window: int):
        self._cache = cache
        self._window = window
        self._queue: deque[Key] = deque()

    def replace(self, keys: list[Key]) -> None:
        self._queue = deque(keys)

    def __len__(self) -> int:
        return len(self._queue)

    def pump(self) -> None:
        """Issue queued prefetches while the window has room. Drops the rest at the first one the cache refuses:
        they rank lower still, and asking for each would cost an eviction search per queued expert."""
        room = self._window - self._cache.engine.prefetches_in_flight()
        while room > 0 and self._queue:
            key = self._queue.popleft()
            if key in self._cache:
                continue
            if not self._cache.prefetch(key):
                self._queue.clear()
                break
            room -= 1
