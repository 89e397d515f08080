"""The device expert cache: a fixed number of preallocated slots, each holding one expert of any MoE layer.

All slots live in one uint8 pool ``[num_slots, slot_bytes]`` on the compute device; the layer computation reads
typed views of it (``views``). Which expert sits where, and which one leaves when a slot is needed, is decided
here; moving the bytes is the copy engine's job.

Slots that the current layer computation is about to read are *protected*: neither a demand fetch for another
expert of the same layer nor a prefetch may take them until ``release``.

Everything is kept in numpy arrays -- per slot (its expert's layer and id, last use, protection) and per expert
(``[L, E]``: its slot or -1, whether it is an unused prefetch) -- so a layer's acquisition, and a batch of
prefetches, cost a few vectorised operations whatever the number of experts or slots, not a Python loop over them.
The only per-expert Python work left is handing each copy to the copy engine.
"""

from __future__ import annotations

import numpy as np
import torch

from tritonmoe.backend.offload.copy_engine import CopyEngine
from .eviction import EvictionPolicy, Key, lowest_first
from tritonmoe.backend.offload.host_store import HostExpertStore
from tritonmoe.backend.offload.stats import OffloadStats


class ExpertCache:
    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, eviction: EvictionPolicy,
                 engine: CopyEngine, stats: OffloadStats):
        if num_slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        self.store = store
        self.num_slots = num_slots
        self.pool = torch.empty((num_slots, store.layout.slot_bytes), dtype=torch.uint8, device=device)
        self.views = store.layout.views(self.pool)  # name -> [num_slots, *shape]
        # the same bytes as 8-byte words for gathers (layouts pad slots to 4 KiB; any other size stays bytes)
        self.pool_words = self.pool.view(torch.int64) if store.layout.slot_bytes % 8 == 0 else self.pool
        self.eviction = eviction
        self.stats = stats
        self.engine = engine
        engine.bind(self.pool, store)
        shape = (store.num_layers, store.num_experts)
        self.slot_of = np.full(shape, -1, dtype=np.int64)  # [L, E]: the expert's slot, -1 when not resident
        # [L, E]: whether each expert is resident (prefetch planning skips these); always slot_of >= 0
        self.resident_mask = np.zeros(shape, dtype=bool)
        self._unused_prefetch = np.zeros(shape, dtype=bool)  # [L, E]: prefetched, not used since
        self._layer = np.full(num_slots, -1, dtype=np.int64)  # per slot: its expert's MoE layer, -1 when free
        self._expert = np.zeros(num_slots, dtype=np.int64)
        self._tick = np.zeros(num_slots, dtype=np.int64)  # last use (or arrival): higher = more recent
        self._clock = 0
        self._protected = np.zeros(num_slots, dtype=bool)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first: views stay short

    def __contains__(self, key: Key) -> bool:
        return bool(self.slot_of[key] >= 0)

    def resident(self) -> list[Key]:
        """Resident keys, least recently used first."""
        slots = np.flatnonzero(self._layer >= 0)
        slots = slots[np.argsort(self._tick[slots], kind="stable")]
        return [(int(self._layer[s]), int(self._expert[s])) for s in slots]

    def _touch(self, slots: np.ndarray) -> None:
        """Mark ``slots`` used now, in their order (the last one most recent)."""
        n = len(slots)
        self._tick[slots] = np.arange(self._clock + 1, self._clock + 1 + n)
        self._clock += n

    def acquire(self, layer: int, experts) -> np.ndarray:
        """Slots holding ``experts`` (distinct ids) of ``layer`` (at most ``num_slots`` of them), fetching the
        missing ones on demand; they are used in the order given (recency follows it). The slots stay protected
        until :meth:`release`."""
        experts = np.asarray(experts, dtype=np.int64).reshape(-1)
        n = len(experts)
        if n > self.num_slots:
            raise ValueError(f"{n} experts cannot be resident at once in {self.num_slots} slots")
        slots = self.slot_of[layer, experts]  # a copy (fancy indexing)
        hit = slots >= 0
        self._protected[:] = False
        self._protected[slots[hit]] = True
        missing = np.flatnonzero(~hit)
        m = len(missing)
        stats = self.stats
        stats.uses[layer] += n
        stats.hits[layer] += n - m
        stats.misses[layer] += m
        if m < n:  # hits that a prefetch brought in: used now
            hit_experts = experts[hit]
            used = self._unused_prefetch[layer, hit_experts]
            if used.any():
                stats.prefetches_used[layer] += int(used.sum())
                self._unused_prefetch[layer, hit_experts] = False
        if m:
            # slots for the misses: free ones, then one selection of victims for all of them
            spare = [self._free.pop() for _ in range(min(m, len(self._free)))]
            if m > len(spare):
                spare.extend(self._evict(self._lowest(m - len(spare))).tolist())
            miss_experts = experts[missing]
            self._load(layer, miss_experts, np.asarray(spare, dtype=np.int64), urgent=True)
            slots[missing] = spare
            self._protected[spare] = True
        self._touch(slots)
        self.eviction.on_use(layer, experts)
        return slots

    def release(self) -> None:
        self._protected[:] = False

    def prefetch(self, key: Key) -> bool:
        """Start loading ``key`` if a slot can be had for it; False when the eviction policy ranks every
        evictable expert above it (or all are protected)."""
        if key in self:
            return True
        issued, _ = self.prefetch_many(np.array([key[0]]), np.array([key[1]]), 1)
        return len(issued) == 1

    def prefetch_many(self, layers: np.ndarray, experts: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
        """Start loading up to ``limit`` of the non-resident experts ``(layers[i], experts[i])``, taken in their
        order (most urgent first). A free slot takes any of them; otherwise one goes over the lowest remaining
        victim if the eviction policy admits it there, else it is skipped (it ranks below every evictable expert
        left) and the next is tried. Victims are chosen once for the batch, lowest first, among the experts
        resident before the call: a batch's prefetches never evict one another. Returns the indices issued
        and how many candidates were considered (a prefix: those after it were not looked at)."""
        n = len(layers)
        if not n or limit <= 0:
            return np.zeros(0, dtype=np.int64), 0
        free = min(limit, len(self._free), n)
        victims = self._lowest(min(limit, n) - free, strict=False) if min(limit, n) > free else np.zeros(0, np.int64)
        if not len(victims) or getattr(self.eviction, "always_admits", False):  # a prefix: free slots, victims
            considered = free + len(victims)
            chosen = np.arange(considered)
            spare = [self._free.pop() for _ in range(free)]
            if len(victims):
                spare.extend(self._evict(victims).tolist())
        else:
            # admission of every candidate over every victim, in one call; then a merge in urgency order
            m = len(victims)
            ok = self.eviction.admits(np.repeat(layers, m), np.repeat(experts, m), np.tile(self._layer[victims], n),
                                      np.tile(self._expert[victims], n)).reshape(n, m)
            chosen, taken, considered = [], [], n
            f = 0
            for i in range(n):
                if f < free:
                    chosen.append(i)
                    f += 1
                elif ok[i, len(taken)]:
                    chosen.append(i)
                    taken.append(len(taken))
                    if len(taken) == m:
                        considered = i + 1
                        break
                if len(chosen) == limit:
                    considered = i + 1
                    break
            spare = [self._free.pop() for _ in range(f)]
            if taken:
                spare.extend(self._evict(victims[:len(taken)]).tolist())
            chosen = np.asarray(chosen, dtype=np.int64)
        if len(chosen):
            ls, es = layers[chosen], experts[chosen]
            self._load(ls, es, np.asarray(spare, dtype=np.int64), urgent=False)
            self._unused_prefetch[ls, es] = True
            np.add.at(self.stats.prefetches, ls, 1)
        return chosen, considered

    def _lowest(self, n: int, strict: bool = True) -> np.ndarray:
        """Slots of the ``n`` evictable experts the policy values least, in eviction order (fewer when fewer are
        evictable and not ``strict``)."""
        candidates = np.flatnonzero(~self._protected & (self._layer >= 0))
        if len(candidates) < n:
            if strict:
                raise RuntimeError("every cache slot is protected; acquire() takes at most num_slots experts")
            n = len(candidates)
            if not n:
                return candidates
        values = self.eviction.values(self._layer[candidates], self._expert[candidates])
        return candidates[lowest_first(values, self._tick[candidates], n)]

    def _evict(self, slots: np.ndarray) -> np.ndarray:
        """Empty ``slots``; returns them."""
        layers, experts = self._layer[slots], self._expert[slots]
        wasted = self._unused_prefetch[layers, experts]
        if wasted.any():
            np.add.at(self.stats.prefetches_wasted, layers[wasted], 1)
            self._unused_prefetch[layers, experts] = False
        self.slot_of[layers, experts] = -1
        self.resident_mask[layers, experts] = False
        self._layer[slots] = -1
        return slots

    def _load(self, layers, experts: np.ndarray, slots: np.ndarray, urgent: bool) -> None:
        """Start copying ``experts`` (of ``layers``: one layer or one per expert) into ``slots``."""
        self.engine.load_many(slots, layers, experts, urgent)
        nbytes = len(slots) * self.store.layout.slot_bytes
        if np.ndim(layers) == 0:
            (self.stats.demand_bytes if urgent else self.stats.prefetch_bytes)[layers] += nbytes
        else:
            np.add.at(self.stats.demand_bytes if urgent else self.stats.prefetch_bytes, layers,
                      self.store.layout.slot_bytes)
        self.slot_of[layers, experts] = slots
        self.resident_mask[layers, experts] = True
        self._layer[slots], self._expert[slots] = layers, experts
        self._touch(slots)  # a new arrival counts as most recently used
