"""Which cached expert to evict. Keys are ``(moe_layer, expert)``.

Each policy values the evictable experts (arrays of their layers and experts); the cache evicts the lowest
values first and breaks ties by recency: among equals, the least recently used goes. LRU values all alike.
The misses of one layer are evicted for together: values do not change while a layer acquires its experts
(the prediction is fixed, and the experts it uses are protected), so one selection equals one per miss.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Key = tuple[int, int]


def lowest_first(values: np.ndarray, ticks: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` lowest ``values`` in eviction order: by value, equal values least recent (lowest tick)
    first. O(len) for the usual small ``n`` (one partition), not a full sort.

    The two keys travel as one complex number ``value + i * tick`` (numpy orders complex numbers by real part, then
    imaginary part; ticks are distinct integers below 2**53, so exact), so one partition and one small sort give the
    order: a handful of numpy calls, which is what a selection over a few hundred slots costs on the host."""
    if n >= len(values):
        return np.lexsort((ticks, values))
    key = values + 1j * ticks
    if n == 1:
        return np.array([key.argmin()])
    part = np.argpartition(key, n - 1)[:n]
    return part[np.argsort(key[part])]


class EvictionPolicy(Protocol):
    def on_use(self, layer: int, experts: np.ndarray) -> None:
        """Distinct ``experts`` of ``layer`` were used by the computation (hits and demand fetches; not prefetches)."""

    def values(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """How much each candidate ``(layers[i], experts[i])`` is worth keeping: the cache evicts the lowest
        first, equal values least recently used first (see :func:`lowest_first`)."""

    def admits(self, layers: np.ndarray, experts: np.ndarray, victim_layers: np.ndarray,
               victim_experts: np.ndarray) -> np.ndarray:
        """Per pair ``i``: whether a prefetch of ``(layers[i], experts[i])`` is worth evicting victim ``i``."""


class LRUEviction:
    always_admits = True  # a prefetch may replace any victim

    def on_use(self, layer: int, experts: np.ndarray) -> None:
        pass

    def values(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return np.zeros(len(layers))  # all equal: recency alone decides

    def cell_values(self, cells: np.ndarray) -> np.ndarray:
        return np.zeros(len(cells))

    def values_state(self):
        return 0  # values never change

    def admits(self, layers, experts, victim_layers, victim_experts) -> np.ndarray:
        return np.ones(len(layers), dtype=bool)


class LFUEviction:
    """Fewest uses first. Counts belong to the expert and survive its eviction, as MoE-Infinity's visit counts do."""

    always_admits = True

    def __init__(self):
        self.uses = np.zeros((0, 0), dtype=np.int64)  # [layer, expert], grown on demand
        self._changes = 0

    def values_state(self):
        return self._changes

    def on_use(self, layer: int, experts: np.ndarray) -> None:
        experts = np.asarray(experts)
        if not len(experts):
            return
        top = int(experts.max())
        if layer >= self.uses.shape[0] or top >= self.uses.shape[1]:
            grown = np.zeros((max(layer + 1, self.uses.shape[0]), max(top + 1, self.uses.shape[1])), np.int64)
            grown[:self.uses.shape[0], :self.uses.shape[1]] = self.uses
            self.uses = grown
        self.uses[layer, experts] += 1  # distinct experts: no repeated index
        self._changes += 1

    def count(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        inside = (layers < self.uses.shape[0]) & (experts < self.uses.shape[1])
        if inside.all():
            return self.uses[layers, experts]
        out = np.zeros(len(layers), dtype=np.int64)
        out[inside] = self.uses[layers[inside], experts[inside]]
        return out

    def values(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return self.count(layers, experts)

    def admits(self, layers, experts, victim_layers, victim_experts) -> np.ndarray:
        return np.ones(len(layers), dtype=bool)


class ActivationAwareEviction:
    """MoE-Infinity's rule: evict the lowest ``(p[i][e] + eps) * (1 - i/L) / sum_e p[i][e]``.

    ``p`` is the predictor's current expert-activation prediction (``prediction`` attribute, ``[L, E]``);
    the ``(1 - i/L)`` factor keeps early layers longest, since prefetching cannot hide their misses. A prefetch
    is admitted only over a victim of lower score, so predictions never evict what they rank higher.

    ``frequency_weight`` ``w`` > 0 adds ``w * f[i][e]``, ``f`` each layer's expert uses so far (hits and demand
    fetches, as LFU counts them) row-normalised: a long-run popularity prior beside the request-level prediction.
    Decisions replayed on learned routing: at ``w = 2`` batch 8 gains .02-.06 hit rate over both the prediction
    alone and LFU (the union of a batch's experts is where the EAMC guess is weakest), batch 1 moves by <= .005
    (docs/offloading_log.md, "A frequency prior"). ``frequency_half_life`` ``H`` > 0: a use counts ``0.5 ** (1 /
    H)`` less with each later use of its layer, so the prior follows a shifting request mix instead of keeping
    every use since the process began ("A frequency prior that forgets")."""

    EPS = 1e-6
    TABLES_KEPT = 128  # eviction tables kept with read-only predictions (each L x E float64)
    always_admits = False

    def __init__(self, predictor, depth_weighted: bool = True, frequency_weight: float = 0.0,
                 frequency_half_life: float = 0.0):
        self._predictor = predictor
        self.frequency_weight = frequency_weight
        self._decay = 0.5 ** (1.0 / frequency_half_life) if frequency_half_life > 0 else 1.0
        self._uses = None  # [L, E] uses per expert, when frequency_weight > 0
        self._freq = None  # [L, E] each layer's row of _uses, normalised
        self._freq_changes = 0
        self._blended = None  # (base table, _freq_changes, base + w * freq)
        # False (the serving default, expert_eviction_depth_factor): every layer's experts score alike; with the
        # factor batch 8 lost .05-.09 hit rate and 7% TPOT on the H200, batch 1 gained nothing (docs/offloading_log.md)
        self.depth_weighted = depth_weighted
        self._table = None  # (prediction array, its version, [L, E] scores)
        self._kept: dict[int, tuple] = {}  # id -> (read-only prediction, its scores)
        self._depth = None  # [L, 1]: 1 - i/L

    def on_use(self, layer: int, experts: np.ndarray) -> None:
        if not self.frequency_weight or not len(experts):
            return
        if self._uses is None:
            self._uses = np.zeros(self._predictor.prediction.shape)
            self._freq = np.zeros_like(self._uses)
        row = self._uses[layer]
        if self._decay != 1.0:
            row *= self._decay  # the row is read normalised: only the older uses' share shrinks
        row[np.asarray(experts)] += 1  # distinct experts: no repeated index
        np.divide(row, row.sum(), out=self._freq[layer])
        self._freq_changes += 1

    def table(self) -> np.ndarray:
        """``[L, E]`` scores: of the current prediction, computed once per prediction (a predictor that updates
        its array in place says so by a ``version`` attribute; without one, every call recomputes), plus the
        frequency prior once per change of either."""
        base = self._prediction_table()
        if self._freq is None:
            return base
        if self._blended is None or self._blended[0] is not base or self._blended[1] != self._freq_changes:
            blended = self._freq * self.frequency_weight
            blended += base
            self._blended = (base, self._freq_changes, blended)
        return self._blended[2]

    def _prediction_table(self) -> np.ndarray:
        p = self._predictor.prediction
        version = getattr(self._predictor, "version", None)
        if self._table is not None and version is not None and self._table[0] is p and self._table[1] == version:
            return self._table[2]
        frozen = not p.flags.writeable  # a read-only prediction cannot change: its table is kept with it
        if frozen:
            kept = self._kept.get(id(p))
            if kept is not None and kept[0] is p:
                self._table = (p, version, kept[1])
                return kept[1]
        num_layers, num_experts = p.shape
        if self._depth is None or len(self._depth) != num_layers:
            self._depth = ((1.0 - np.arange(num_layers) / num_layers) if self.depth_weighted
                           else np.ones(num_layers))[:, None]
        # eps on every cell keeps the score defined (and uniform within a layer) when a layer has no prediction
        row_sum = p.sum(axis=1, keepdims=True) + num_experts * self.EPS
        table = p + self.EPS  # (p + eps) / row_sum * (1 - i/L), in place: the same roundings, fewer arrays
        table /= row_sum
        table *= self._depth
        self._table = (p, version, table)
        if frozen:
            if len(self._kept) >= self.TABLES_KEPT:
                del self._kept[next(iter(self._kept))]  # the oldest
            self._kept[id(p)] = (p, table)  # holding p keeps its id unique
        return table

    def values_state(self):
        """Equal on two calls only if no value changed in between (None: cannot tell, e.g. a predictor without
        a ``version``)."""
        version = getattr(self._predictor, "version", None)
        return None if version is None else (version, id(self._predictor.prediction), self._freq_changes)

    def scores(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return self.table()[layers, experts]

    def values(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return self.scores(layers, experts)

    def cell_values(self, cells: np.ndarray) -> np.ndarray:
        """:meth:`values` of the experts ``cells`` = ``layer * num_experts + expert`` (one gather)."""
        return self.table().ravel().take(cells)

    def admits(self, layers, experts, victim_layers, victim_experts) -> np.ndarray:
        n = len(layers)
        s = self.scores(np.concatenate([layers, victim_layers]), np.concatenate([experts, victim_experts]))
        return s[:n] > s[n:]

    def admitted_above(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """What :meth:`admits` compares: a prefetch of ``(layers[i], experts[i])`` is admitted over a victim iff
        this is above the victim's :meth:`values` (which the cache has from choosing it)."""
        return self.scores(layers, experts)


class BatchAwareEviction:
    """LRU for the decode step of a lone sequence, activation-aware eviction for every other forward: decode steps
    of two or more sequences and every prefill (the serving default, ``expert_eviction: auto``).

    Measured on the H200 (25%, docs/offloading_log.md): at batch 8 activation-aware eviction copies the fewest experts
    and is the fastest or tied-fastest policy; at batch 1, where decode is host-bound, LRU with the same lookahead
    prefetch was faster in every run (DeepSeek-V2-Lite shapes 59-67 vs 75-92 ms per token, Qwen3-30B-A3B 118-136 vs
    145-161) for nearly the same hit rate: the prediction's upkeep costs more host time than its extra hits save.
    A prefill is not a lone decode step even for one sequence: it touches most of a layer's experts, host time
    per token is no concern there, and the serving engine prefills each admitted request in a forward of its own
    -- under LRU that forward would evict the running batch's experts for the prompt's (the activation-aware rows
    also had the lowest TTFT at batch 1 on the H200). Uses are counted in both modes, so the frequency prior is
    current when a batch forms. ``single`` is set per forward by the offloader (:meth:`set_forward`)."""

    def __init__(self, activation: "ActivationAwareEviction"):
        self.activation = activation
        self._lru = LRUEviction()
        self.single = True

    def set_forward(self, sequences: int, phase: str) -> None:
        self.single = sequences <= 1 and phase == "decode"

    @property
    def _active(self):
        return self._lru if self.single else self.activation

    @property
    def always_admits(self) -> bool:
        return self._active.always_admits

    def on_use(self, layer: int, experts: np.ndarray) -> None:
        self.activation.on_use(layer, experts)

    def values(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return self._active.values(layers, experts)

    def cell_values(self, cells: np.ndarray) -> np.ndarray:
        return self._active.cell_values(cells)

    def values_state(self):
        if self.single:
            return "single"
        state = self.activation.values_state()
        return None if state is None else ("batch", state)

    def admits(self, layers, experts, victim_layers, victim_experts) -> np.ndarray:
        return self._active.admits(layers, experts, victim_layers, victim_experts)

    def admitted_above(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return self.activation.admitted_above(layers, experts)  # asked only when not always_admits: batch mode


def make_eviction_policy(name: str, predictor=None, depth_factor: bool = True, frequency_weight: float = 0.0,
                         frequency_half_life: float = 0.0) -> EvictionPolicy:
    if name == "lru":
        return LRUEviction()
    if name == "lfu":
        return LFUEviction()
    if name in ("activation", "auto"):
        if predictor is None:
            raise ValueError("activation-aware eviction needs the activation predictor")
        policy = ActivationAwareEviction(predictor, depth_weighted=depth_factor, frequency_weight=frequency_weight,
                                         frequency_half_life=frequency_half_life)
        return policy if name == "activation" else BatchAwareEviction(policy)
    raise ValueError(f"unknown eviction policy {name!r}")
