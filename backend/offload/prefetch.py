"""What to prefetch. After each MoE layer's routing, the policy names the experts of coming layers to load, in
priority order; that list replaces the queue of not-yet-issued prefetches (a new prediction makes the old one stale).
The :class:`PrefetchQueue` issues them a few at a time, so on-demand fetches never queue behind all of them."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .cache import ExpertCache
from .eam import ActivationPredictor
from .eviction import Key


Plan = tuple[np.ndarray, np.ndarray]  # (MoE layers, experts), most urgent first


def _empty_plan() -> Plan:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)


class PrefetchPolicy(Protocol):
    def launch(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Device work the plan needs, queued before the layer's routing is read back so that one read-back
        returns both (an integer tensor on the routing's device), or None."""

    def plan(self, layer: int, hidden_states: torch.Tensor, launched: np.ndarray | None = None) -> Plan:
        """Experts to prefetch once MoE layer ``layer`` has routed ``hidden_states``, most urgent first;
        ``launched``: what :meth:`launch` returned, read back to the host."""


class NoPrefetch:
    """On-demand fetching only."""

    def launch(self, layer: int, hidden_states: torch.Tensor) -> None:
        return None

    def plan(self, layer: int, hidden_states: torch.Tensor, launched=None) -> Plan:
        return _empty_plan()


class ActivationPrefetch:
    """MoE-Infinity: the EAMC-matched prediction, layer-proximity weighted, over all coming layers.

    ``resident`` (``[L, E]`` bool, the cache's live mask) leaves out what is already there, and ``limit`` keeps
    the head of the order only: a layer issues at most a window or two of prefetches before the next layer
    replaces the plan, so ordering thousands of experts every layer would be waste."""

    def __init__(self, predictor: ActivationPredictor, resident: np.ndarray | None = None, limit: int | None = None):
        self._predictor = predictor
        self._resident = resident
        self._limit = limit

    def launch(self, layer: int, hidden_states: torch.Tensor) -> None:
        return None

    def plan(self, layer: int, hidden_states: torch.Tensor, launched=None) -> Plan:
        return self._predictor.prefetch_plan(layer, exclude=self._resident, limit=self._limit)


class RouterLookaheadPrefetch:
    """Apply the next MoE layer's router to this layer's hidden states and prefetch what it picks, most-picked
    first. ``routers[i]`` is MoE layer ``i``'s router module, returning ``(..., top_k_index)``. With LRU eviction
    this is the issue's router-lookahead baseline; with activation-aware eviction (the default's batch mode) the
    picks also ``refine`` the prediction that eviction reads."""

    def __init__(self, routers: list[torch.nn.Module], num_experts: int,
                 refined: "LookaheadRefinedPrediction | None" = None):
        self.routers = routers
        self._refined = refined
        self._num_experts = num_experts

    @torch.no_grad()
    def launch(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The next layer's picks, counted per expert where the routing is (a small tensor, not every pick)."""
        if layer + 1 >= len(self.routers):
            return None
        # .forward, not __call__: the router's hooks (e.g. router-logit capture) must not see this extra call
        picks = self.routers[layer + 1].forward(hidden_states)[-1].reshape(-1)
        # a scatter, not torch.bincount: on CUDA bincount reads the largest pick back to size its output, a
        # host sync per layer before the one the read-back makes anyway
        counts = torch.zeros(self._num_experts, dtype=torch.int64, device=picks.device)
        return counts.scatter_add_(0, picks.long(), torch.ones_like(picks, dtype=torch.int64))

    def plan(self, layer: int, hidden_states: torch.Tensor, launched: np.ndarray | None = None) -> Plan:
        if layer + 1 >= len(self.routers):
            return _empty_plan()
        picks = launched if launched is not None else self.launch(layer, hidden_states).cpu().numpy()
        if self._refined is not None:
            self._refined.refine(layer + 1, picks)
        experts = np.flatnonzero(picks)
        experts = experts[np.argsort(-picks[experts], kind="stable")]  # most picked first; ties by expert id
        return np.full(len(experts), layer + 1, dtype=np.int64), experts.astype(np.int64)


class LookaheadRefinedPrediction:
    """The activation predictor's ``[L, E]`` prediction with the next layer's row taken from the router lookahead:
    what activation-aware eviction reads when the lookahead prefetches.

    The EAMC prediction is a request-level guess (precision@k ~.2-.25 on learned routing); the next layer's router
    applied to the current hidden state names that layer's experts for this very token (precision ~.9). With the
    plain prediction, activation-aware admission refused most of the lookahead's prefetches (they ranked below
    what was resident; recall .31); with this one they score as what they are -- about to be used. Only the next
    layer's row: keeping the rows of layers already passed as well measured worse (decisions replayed, DeepSeek
    batch 8: hit rate .325 vs .384). Duck-types the predictor's ``prediction``/``version`` for
    :class:`~.eviction.ActivationAwareEviction`."""

    def __init__(self, predictor: ActivationPredictor):
        self._predictor = predictor
        self._row: tuple[int, np.ndarray] | None = None  # (layer, its distribution) of the current forward
        self._refinements = 0
        self._made = None  # (key, refined array)

    def begin_forward(self) -> None:
        if self._row is not None:
            self._row = None
            self._refinements += 1

    def refine(self, layer: int, picks: np.ndarray) -> None:
        """``picks``: how often the lookahead picked each expert of ``layer`` (the batch's tokens together)."""
        total = picks.sum()
        self._row = (layer, picks / total) if total else None
        self._refinements += 1

    @property
    def version(self):
        return (self._predictor.version, self._refinements)

    @property
    def prediction(self) -> np.ndarray:
        base = self._predictor.prediction
        if self._row is None:
            return base
        key = (id(base), self.version)
        if self._made is None or self._made[0] != key:
            refined = base.copy()
            layer, row = self._row
            refined[layer] = row
            self._made = (key, refined)
        return self._made[1]


class PrefetchQueue:
    """Prefetches waiting to be issued, most urgent first, with at most ``window`` in flight at a time."""

    def __init__(self, cache: ExpertCache, window: int):
        self._cache = cache
        self._window = window
        self._layers, self._experts = _empty_plan()

    def replace(self, plan) -> None:
        """``plan``: ``(layers, experts)`` arrays, or a list of ``(layer, expert)`` keys."""
        if isinstance(plan, tuple) and len(plan) == 2 and isinstance(plan[0], np.ndarray):
            self._layers, self._experts = plan
        else:
            keys = np.asarray(list(plan), dtype=np.int64).reshape(-1, 2)
            self._layers, self._experts = keys[:, 0], keys[:, 1]

    def __len__(self) -> int:
        return len(self._layers)

    def pump(self) -> None:
        """Issue queued prefetches while the window has room, skipping resident ones and ones the cache refuses
        (they rank below every expert they could replace; the ones after them may not)."""
        if not len(self._layers):
            return
        room = self._window - self._cache.engine.prefetches_in_flight()
        if room <= 0:
            return
        layers, experts = self._layers, self._experts
        resident = self._cache.resident_mask[layers, experts]
        if resident.any():  # (a plan that leaves out resident experts has none until it is pumped)
            absent = np.flatnonzero(~resident)
            layers, experts = layers[absent], experts[absent]
        else:
            absent = None
        _, considered = self._cache.prefetch_many(layers, experts, room)
        if considered >= len(layers):  # everything was issued, refused or found resident
            self._layers, self._experts = _empty_plan()
        else:  # what follows the last one considered stays queued
            cut = considered if absent is None else absent[considered]
            self._layers, self._experts = self._layers[cut:], self._experts[cut:]
