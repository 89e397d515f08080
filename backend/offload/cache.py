"""The device expert cache: a fixed number of preallocated slots, each holding one expert of any MoE layer.

All slots live in one uint8 pool ``[num_slots, slot_bytes]`` on the compute device; the layer computation reads
typed views of it (``views``). Which expert sits where, and which one leaves when a slot is needed, is decided
here; moving the bytes is the copy engine's job.

Slots that the current layer computation is about to read are *protected*: neither a demand fetch for another
expert of the same layer nor a prefetch may take them until ``release``.

What each slot holds, when it was last used and whether it is protected are kept in per-slot numpy arrays, so
choosing a victim is a few vectorised operations over the slots, not a Python scan (thousands of slots at full
model size, and one choice per miss and per prefetch).
"""

from __future__ import annotations

import numpy as np
import torch

from .copy_engine import CopyEngine
from .eviction import EvictionPolicy, Key, lowest_first
from .host_store import HostExpertStore
from .stats import OffloadStats


class ExpertCache:
    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, eviction: EvictionPolicy,
                 engine: CopyEngine, stats: OffloadStats):
        if num_slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        self.store = store
        self.num_slots = num_slots
        self.pool = torch.empty((num_slots, store.layout.slot_bytes), dtype=torch.uint8, device=device)
        self.views = store.layout.views(self.pool)  # name -> [num_slots, *shape]
        self.eviction = eviction
        self.stats = stats
        self.engine = engine
        self._slot_of: dict[Key, int] = {}
        self._layer = np.full(num_slots, -1, dtype=np.int64)  # per slot: its expert's MoE layer, -1 when free
        self._expert = np.zeros(num_slots, dtype=np.int64)
        self._tick = np.zeros(num_slots, dtype=np.int64)  # last use (or arrival): higher = more recent
        self._clock = 0
        self._protected = np.zeros(num_slots, dtype=bool)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first: views stay short
        self._unused_prefetches: set[Key] = set()
        # [L, E]: whether each expert is resident (prefetch planning skips these without a Python loop)
        self.resident_mask = np.zeros((store.num_layers, store.num_experts), dtype=bool)

    def __contains__(self, key: Key) -> bool:
        return key in self._slot_of

    def resident(self) -> list[Key]:
        """Resident keys, least recently used first."""
        slots = np.flatnonzero(self._layer >= 0)
        slots = slots[np.argsort(self._tick[slots], kind="stable")]
        return [(int(self._layer[s]), int(self._expert[s])) for s in slots]

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._tick[slot] = self._clock

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Slots holding ``experts`` of ``layer`` (at most ``num_slots`` of them), fetching the missing ones on
        demand. The slots stay protected until :meth:`release`."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts cannot be resident at once in {self.num_slots} slots")
        keys = [(layer, e) for e in experts]
        self._protected[:] = False
        missing = 0
        for k in keys:
            if k in self._slot_of:
                self._protected[self._slot_of[k]] = True
            else:
                missing += 1
        # slots for the misses: free ones, then one selection of victims for all of them
        spare = [self._free.pop() for _ in range(min(missing, len(self._free)))]
        spare += self._evict_lowest(missing - len(spare))
        spare.reverse()  # pop() below hands them out in eviction order
        slots = []
        for key in keys:
            slot = self._slot_of.get(key)
            self.stats.uses[layer] += 1
            if slot is None:
                self.stats.misses[layer] += 1
                slot = spare.pop()
                self._load(key, slot, urgent=True)
            else:
                self.stats.hits[layer] += 1
                if key in self._unused_prefetches:
                    self._unused_prefetches.discard(key)
                    self.stats.prefetches_used[layer] += 1
            self._protected[slot] = True
            self._touch(slot)
            self.eviction.on_use(key)
            slots.append(slot)
        return slots

    def release(self) -> None:
        self._protected[:] = False

    def prefetch(self, key: Key) -> bool:
        """Start loading ``key`` if a slot can be had for it; False when the eviction policy ranks every
        evictable expert above it (or all are protected)."""
        if key in self._slot_of:
            return True
        slot = self._claim_slot(incoming=key)
        if slot is None:
            return False
        self._load(key, slot, urgent=False)
        self._unused_prefetches.add(key)
        self.stats.prefetches[key[0]] += 1
        return True

    def _lowest(self, n: int) -> np.ndarray:
        """Slots of the ``n`` evictable experts the policy values least, in eviction order."""
        candidates = np.flatnonzero(~self._protected & (self._layer >= 0))
        if len(candidates) < n:
            raise RuntimeError("every cache slot is protected; acquire() takes at most num_slots experts")
        values = self.eviction.values(self._layer[candidates], self._expert[candidates])
        return candidates[lowest_first(values, self._tick[candidates], n)]

    def _evict_lowest(self, n: int) -> list[int]:
        if n <= 0:
            return []
        return [self._evict((int(self._layer[s]), int(self._expert[s]))) for s in self._lowest(n)]

    def _claim_slot(self, incoming: Key) -> int | None:
        """For a prefetch of ``incoming``: a free slot, or the slot of an evicted expert the policy values below
        it; None when there is none."""
        if self._free:
            return self._free.pop()
        if not (~self._protected).any():
            return None
        slot = int(self._lowest(1)[0])
        victim = (int(self._layer[slot]), int(self._expert[slot]))
        if not self.eviction.admits(incoming, victim):
            return None
        return self._evict(victim)

    def _evict(self, key: Key) -> int:
        if key in self._unused_prefetches:
            self._unused_prefetches.discard(key)
            self.stats.prefetches_wasted[key[0]] += 1
        slot = self._slot_of.pop(key)
        self._layer[slot] = -1
        self.resident_mask[key] = False
        return slot

    def _load(self, key: Key, slot: int, urgent: bool) -> None:
        layer, expert = key
        src = self.store.buffer(layer, expert)
        self.engine.load(slot, self.pool[slot], src, urgent=urgent, layer=layer)
        nbytes = src.numel()
        if urgent:
            self.stats.demand_bytes[layer] += nbytes
        else:
            self.stats.prefetch_bytes[layer] += nbytes
        self._slot_of[key] = slot
        self._layer[slot], self._expert[slot] = layer, expert
        self.resident_mask[key] = True
        self._touch(slot)  # a new arrival counts as most recently used
