"""Expert activation matrices (MoE-Infinity, arXiv 2401.14361 §4): tracing, the collection, and matching.

- EAM: ``L x E`` counts, ``M[i][j]`` = tokens of a request routed to expert ``j`` of MoE layer ``i``. Each running
  request keeps two, prefill and decode apart (:class:`ActivationTracer`). A request resumed after a live
  migration recomputes its earlier output in its prefill; those rows were decode steps where it began, and they
  count into its decode EAM, which so starts as the source's (``resumed`` below).
- EAMC: a fixed-capacity collection of finished requests' EAMs; when full, a new one replaces the stored EAM most
  similar to it by cosine, which keeps both recency and diversity (:class:`EAMCollection`).
- Prediction: the running request's partial EAM (rows up to the current layer) is matched against the collection by
  cosine; the best matches are summed cell by cell and each row normalised into probabilities
  (:class:`ActivationPredictor`). Prefetching weights future layer ``i`` by ``1 - (i - l)/L``; eviction uses the same
  prediction (see ``eviction.ActivationAwareEviction``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PHASES = ("prefill", "decode")
SHARES_KEPT = 128  # row-normalised match sums kept per collection and phase (each L x E float64: 6 MiB at 48 x 128)


class ActivationTracer:
    """The running requests' EAMs, updated by every MoE layer of every forward."""

    def __init__(self, num_layers: int, num_experts: int):
        self.shape = (num_layers, num_experts)
        self._eams: dict[str, np.ndarray] = {}  # seq_id -> [2 (phase), L, E] counts
        self._rows: list[np.ndarray] = []  # this forward's EAM per row group, for the phase being run
        self._decode_rows: list[np.ndarray] = []  # their decode EAMs, in a prefill with resumed tokens

    def begin_forward(self, seq_ids: list[str], phase: str, resumed: bool = False) -> list[np.ndarray]:
        """Start a forward whose row groups belong to ``seq_ids``; returns their live ``[L, E]`` EAMs.

        ``resumed``: a prefill some of whose rows are output tokens resumed from another server (given to
        :meth:`record` as ``resumed_counts``); those go to the decode EAMs."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if resumed and phase != "prefill":
            raise ValueError("only a prefill recomputes resumed tokens")
        p = PHASES.index(phase)
        eams = [self._eams.setdefault(s, np.zeros((2, *self.shape), dtype=np.int64)) for s in seq_ids]
        self._rows = [e[p] for e in eams]
        self._decode_rows = [e[1] for e in eams] if resumed else []
        return self._rows

    def record(self, layer: int, counts: np.ndarray, resumed_counts: np.ndarray | None = None) -> None:
        """Add ``counts`` (``[len(seq_ids), E]``, tokens per expert of each sequence) to row ``layer``; the part of
        them from resumed tokens (``resumed_counts``, same shape; forwards begun with ``resumed``) goes to the
        decode EAMs instead."""
        for eam, c in zip(self._rows, counts):
            eam[layer] += c
        if resumed_counts is not None:
            for prefill, decode, c in zip(self._rows, self._decode_rows, resumed_counts, strict=True):
                prefill[layer] -= c
                decode[layer] += c

    def finish(self, seq_id: str) -> np.ndarray | None:
        """Forget ``seq_id``; returns its ``[2, L, E]`` EAM (None if it never ran)."""
        return self._eams.pop(seq_id, None)

    def eam(self, seq_id: str) -> np.ndarray | None:
        return self._eams.get(seq_id)


class EAMCollection:
    """At most ``capacity`` request EAMs ``[2, L, E]`` (float32, raw counts)."""

    def __init__(self, capacity: int, num_layers: int, num_experts: int):
        if capacity < 1:
            raise ValueError("EAMC capacity must be at least 1")
        self.capacity = capacity
        self.shape = (2, num_layers, num_experts)
        # replaced, never written in place: a forward's predictor keeps a consistent snapshot
        self.eams = np.zeros((0, *self.shape), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.eams)

    def add(self, eam: np.ndarray) -> None:
        """Insert a finished request's EAM; when full, replace the most similar stored one. Empty EAMs carry no
        information and are skipped."""
        eam = np.asarray(eam, dtype=np.float32)
        if eam.shape != self.shape:
            raise ValueError(f"EAM of shape {eam.shape} does not fit a collection of {self.shape}")
        if not eam.any():
            return
        if len(self.eams) < self.capacity:
            self.eams = np.concatenate([self.eams, eam[None]])
        else:
            eams = self.eams.copy()
            eams[int(np.argmax(cosine(eams.reshape(len(eams), -1), eam.reshape(-1))))] = eam
            self.eams = eams

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.eams)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, capacity: int, num_layers: int, num_experts: int) -> "EAMCollection":
        """A collection filled from ``path``; empty when the file does not exist. Entries beyond ``capacity`` go
        through the same replacement rule as live insertions."""
        coll = cls(capacity, num_layers, num_experts)
        path = Path(path)
        if not path.exists():
            return coll
        eams = np.load(path, allow_pickle=False)
        if eams.ndim != 4 or eams.shape[1:] != coll.shape:
            raise ValueError(f"{path}: EAMs of shape {eams.shape[1:]} do not fit this model's {coll.shape}")
        for eam in eams:
            coll.add(eam)
        return coll


def cosine(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``matrix`` with ``vector``; 0 where either is all zeros."""
    den = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    return np.divide(matrix @ vector, den, out=np.zeros(len(matrix), dtype=np.float64), where=den > 0)


class ActivationPredictor:
    """Predicts, at MoE layer ``l`` of a forward, which experts the batch will use, by matching each sequence's
    partial EAM against the EAMC.

    Similarity over rows ``0..l`` is kept incrementally (dot products and squared norms grow by one row per layer),
    so a layer costs one ``[batch, E] x [E, entries]`` product and a top-k selection; the best matches are summed
    into a new prediction only when some sequence's set of best matches changed. What is derived from a stored
    collection (float64 copy, per-row layout for the products, prefix norms) is kept until the collection
    changes, not rebuilt per forward."""

    def __init__(self, collection: EAMCollection, top_matches: int):
        self.collection = collection
        self.top_matches = top_matches
        _, num_layers, num_experts = collection.shape
        self.num_layers = num_layers
        self.prediction = np.zeros((num_layers, num_experts), dtype=np.float64)  # read by activation eviction
        self.version = 0  # bumped whenever ``prediction`` changes (it is replaced, never written in place)
        # prefetch weight of a layer d ahead: 1 - d/L (row d-1)
        self._proximity = (1.0 - np.arange(1, num_layers + 1) / num_layers)[:, None]
        self._neg_proximity = -self._proximity
        self._derived: dict[int, tuple] = {}  # phase -> (source array, stored64, rows [L, E, n], prefix norms)
        self.begin_forward([], "decode")

    def _derive(self, phase: int):
        src = self.collection.eams
        cached = self._derived.get(phase)
        if cached is not None and cached[0] is src:  # the collection replaces its array on every change
            return cached[1:]
        stored = src[:, phase].astype(np.float64)  # [n, L, E]
        rows = np.ascontiguousarray(stored.transpose(1, 2, 0))  # [L, E, n]: row l's products in one matmul
        norm2 = np.ascontiguousarray(np.cumsum((stored ** 2).sum(axis=2), axis=1).T)  # [L, n] prefixes
        positive = (norm2 > 0).all(axis=1).tolist()  # per layer: no entry is empty up to it
        self._derived[phase] = (src, stored, rows, norm2, positive, {})
        return stored, rows, norm2, positive, {}

    def begin_forward(self, eams: list[np.ndarray], phase: str) -> None:
        """``eams``: the live ``[L, E]`` EAMs of this forward's sequences, in ``phase``."""
        self._eams = eams
        (self._stored, self._stored_rows, self._stored_norm2, self._stored_positive,
         self._shares) = self._derive(PHASES.index(phase))
        self._dot = np.zeros((len(eams), len(self._stored)))
        self._q_norm2 = np.zeros(len(eams))
        self._next_row = 0
        self._chosen = None  # per sequence, the entries its prediction was built from
        self._sums = ([], [])  # (parts, running sums) of the last multi-sequence prediction
        if not eams or not len(self._stored):
            self.prediction = np.zeros_like(self.prediction)
            self.version += 1

    def observe(self, layer: int) -> None:
        """Row ``layer`` of every sequence's EAM is final for this forward: refresh the prediction.

        Counts are integers, so the dot products and squared norms are exact in float64 whatever the order of
        summation; the similarity is ``dot / sqrt(|q|^2 |s|^2)`` (0 where a norm is 0), the best matches an
        ``argpartition`` of it, as they always were."""
        eams = self._eams
        if not eams or not len(self._stored):
            self._next_row = layer + 1
            return
        single = len(eams) == 1
        for row in range(self._next_row, layer + 1):
            if single:  # [E] . [E, entries]
                q = eams[0][row].astype(np.float64)
                self._dot += q @ self._stored_rows[row]
                self._q_norm2 += q @ q
            else:
                q = np.stack([eam[row] for eam in eams]).astype(np.float64)
                self._dot += q @ self._stored_rows[row]  # [batch, entries]
                self._q_norm2 += (q * q).sum(axis=1)
        self._next_row = layer + 1
        if single and self._stored_positive[layer] and self._q_norm2[0] > 0:  # no zero norm: a plain division
            sims = self._dot / np.sqrt(self._stored_norm2[layer] * self._q_norm2[0])
        else:
            den = np.sqrt(self._q_norm2[:, None] * self._stored_norm2[layer])
            if self._stored_positive[layer] and self._q_norm2.all():
                sims = self._dot / den
            else:
                sims = np.divide(self._dot, den, out=np.zeros_like(self._dot), where=den > 0)
        k = min(self.top_matches, sims.shape[1])
        if k < sims.shape[1]:
            best = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            # an entry sharing no expert tells nothing; sorted, so equal sets compare equal
            chosen = [tuple(sorted(e for e in b if s[e] > 0)) for b, s in zip(best.tolist(), sims.tolist())]
        else:
            chosen = [tuple(e for e, v in enumerate(s) if v > 0) for s in sims.tolist()]
        if chosen == self._chosen:
            return  # the same best matches: the same prediction
        if self._chosen is None:
            self._parts = [None] * len(chosen)
        for i, c in enumerate(chosen):  # a sequence's share changes only with its own best matches
            if self._chosen is None or c != self._chosen[i]:
                self._parts[i] = self._share(c) if c else None
        self._chosen = chosen
        parts = [p for p in self._parts if p is not None]
        # one sequence: its (read-only) share is the prediction; several: their sum
        self.prediction = (parts[0] if len(parts) == 1 else self._sum_parts(parts)) if parts else \
            np.zeros_like(self.prediction)
        self.version += 1

    def _sum_parts(self, parts: list[np.ndarray]) -> np.ndarray:
        """``parts[0] + parts[1] + ...`` in that order (bit for bit what ``np.sum(parts, axis=0)`` gives), reusing
        the running sums of the last call up to the first part that changed."""
        kept_parts, kept_sums = self._sums
        same = 0
        while same < len(parts) and same < len(kept_parts) and parts[same] is kept_parts[same]:
            same += 1
        sums = kept_sums[:max(same - 1, 0)]  # sums[i] = parts[0] + ... + parts[i + 1]
        total = sums[-1] if sums else parts[0]
        for p in parts[len(sums) + 1:]:
            total = total + p
            sums.append(total)
        self._sums = (list(parts), sums)
        return total

    def _share(self, chosen: tuple) -> np.ndarray:
        """The row-normalised sum of the stored entries ``chosen``, read-only. Kept per set of entries until the
        collection changes (a sequence's best matches often return to a set they had a few layers before)."""
        share = self._shares.get(chosen)
        if share is None:
            if len(self._shares) >= SHARES_KEPT:
                del self._shares[next(iter(self._shares))]  # the oldest
            share = _row_normalised(_sum_in_order([self._stored[i] for i in chosen]))
            share.setflags(write=False)
            self._shares[chosen] = share
        return share

    def prefetch_plan(self, layer: int, exclude: np.ndarray | None = None,
                      limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Experts of the layers after ``layer`` as ``(layers, experts)`` arrays, most likely first by
        ``p[i][e] * (1 - (i - layer)/L)``, ties in layer-then-expert order. ``exclude`` (``[L, E]`` bool): experts
        to leave out (the resident ones); ``limit``: at most this many, the most likely (a partial sort: only the
        head of the order is ever issued before the next layer's)."""
        future = self.prediction[layer + 1:]
        if not future.size:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        # the weights negated (x * -y is exactly -(x * y)): ascending order = most likely first. Weights are
        # never negative, so the candidates are the nonzero cells
        neg = future * self._neg_proximity[:len(future)]
        positive = neg < 0
        if exclude is not None:
            positive = positive > exclude[layer + 1:]  # and not excluded
        cand = positive.ravel().nonzero()[0]  # (a boolean's nonzero is several times quicker than a float's)
        neg = neg.ravel()
        key = neg[cand]
        if limit is not None and len(cand) > limit:
            head = np.argpartition(key, limit - 1)[:limit]
            cand, key = cand[head], key[head]
        cand = cand[np.lexsort((cand, key))]  # by weight, equal weights by flat (layer, expert) index
        layers, experts = np.divmod(cand, future.shape[1])
        return layers + (layer + 1), experts

    def prefetch_order(self, layer: int, exclude: np.ndarray | None = None,
                       limit: int | None = None) -> list[tuple[int, int]]:
        """:meth:`prefetch_plan` as a list of ``(layer, expert)`` keys."""
        layers, experts = self.prefetch_plan(layer, exclude, limit)
        return list(zip(layers.tolist(), experts.tolist()))


def _row_normalised(m: np.ndarray) -> np.ndarray:
    sums = m.sum(axis=1, keepdims=True)
    if sums.all():
        return m / sums
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def _sum_in_order(arrays: list[np.ndarray]) -> np.ndarray:
    """``arrays[0] + arrays[1] + ...``, left to right: what ``np.sum(np.stack(arrays), axis=0)`` computes (numpy
    reduces an outer axis by adding slice after slice), without stacking."""
    total = arrays[0].copy() if len(arrays) == 1 else arrays[0] + arrays[1]
    for a in arrays[2:]:
        total += a
    return total
