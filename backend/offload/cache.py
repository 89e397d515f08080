"""The device expert cache: a fixed number of preallocated slots, each holding one expert of any MoE layer.

All slots live in one uint8 pool ``[num_slots, slot_bytes]`` on the compute device; the layer computation reads
typed views of it (``views``). Which expert sits where, and which one leaves when a slot is needed, is decided
here; moving the bytes is the copy engine's job.

Slots that the current layer computation is about to read are *protected*: neither a demand fetch for another
expert of the same layer nor a prefetch may take them until ``release``.

Everything is kept in numpy arrays -- per slot (its expert's layer and id, last use, protection) and per expert
(``[L, E]``: its slot or -1, whether it is an unused prefetch) -- so a layer's acquisition, and a batch of
prefetches, cost a few vectorised operations whatever the number of experts or slots, not a Python loop over them.
Evicting or loading a handful of experts (up to ``FEW``) is bookkept element by element instead, which is cheaper
than a dozen array calls; and a layer chooses its victims once, its prefetch pumps continuing that order
(:class:`_Order`). Per expert, the copy engine gets each copy.
"""

from __future__ import annotations

import numpy as np
import torch

from .copy_engine import CopyEngine
from .eviction import EvictionPolicy, Key, lowest_first
from .host_store import HostExpertStore
from .stats import OffloadStats

_NONE = np.zeros(0, dtype=np.int64)
FEW = 8  # up to this many slots, bookkeeping goes element by element (numpy scalar access) instead of by arrays


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
        self._cell = np.zeros(num_slots, dtype=np.int64)  # per slot: layer * num_experts + expert (when resident)
        self._num_experts = store.num_experts
        self._tick = np.zeros(num_slots, dtype=np.int64)  # last use (or arrival): higher = more recent
        self._clock = 0
        self._protected = np.zeros(num_slots, dtype=bool)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first: views stay short
        # The eviction order, carried from one victim selection to the next (see _Order): ``victim_lookahead``
        # victims are chosen beyond what a selection needs (0: none; the offloader sets its prefetch window)
        self.victim_lookahead = 0
        self._epoch = 0  # bumped by every change of slots, recency or protection the order does not follow
        self._order: _Order | None = None
        self._round: np.ndarray = _NONE  # the slots protected by the last acquisition

    def __contains__(self, key: Key) -> bool:
        return bool(self.slot_of[key] >= 0)

    def resident(self) -> list[Key]:
        """Resident keys, least recently used first."""
        slots = np.flatnonzero(self._layer >= 0)
        slots = slots[np.argsort(self._tick[slots], kind="stable")]
        return [(int(self._layer[s]), int(self._expert[s])) for s in slots]

    def _touch(self, slots: np.ndarray) -> None:
        """Mark ``slots`` used now, in their order (the last one most recent)."""
        self._epoch += 1
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
        self._epoch += 1
        self._order = None
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
        order = None
        if m:
            # slots for the misses: free ones, then one selection of victims for all of them
            spare = [self._free.pop() for _ in range(min(m, len(self._free)))]
            if m > len(spare):
                need = m - len(spare)
                order = self._select(need, 2 * self.victim_lookahead)  # the rest: the two prefetch pumps'
                if order is None:
                    victims = self._lowest(need)
                else:
                    if len(order.slots) < need:
                        raise RuntimeError("every cache slot is protected; acquire() takes at most num_slots experts")
                    victims = order.take(need)
                spare.extend(self._evict(victims).tolist())
            miss_experts = experts[missing]
            self._load(layer, miss_experts, np.asarray(spare, dtype=np.int64), urgent=True)
            slots[missing] = spare
            self._protected[spare] = True
        self._touch(slots)
        self.eviction.on_use(layer, experts)
        self._round = slots
        # the order stays valid while the policy's values do (LFU's change with every use)
        self._keep(order)
        return slots

    def release(self) -> None:
        order = self._current()
        self._epoch += 1
        self._protected[:] = False
        if order is not None:  # the round's experts can be evicted again
            order.pending.extend(self._round.tolist())
        self._round = _NONE
        self._keep(order)

    def _values_state(self):
        """The eviction policy's ``values_state()`` (None when it has none: its values cannot be kept)."""
        state = getattr(self.eviction, "values_state", None)
        return None if state is None else state()

    def _keep(self, order: "_Order | None") -> None:
        """Keep ``order`` as the current eviction order, valid until the next change it does not follow."""
        if order is not None and order.state == self._values_state():
            order.epoch = self._epoch
            self._order = order
        else:
            self._order = None

    def _current(self) -> "_Order | None":
        """The kept eviction order if nothing has changed since (else None)."""
        order = self._order
        if order is None or order.epoch != self._epoch or order.state != self._values_state():
            return None
        return order

    def _select(self, n: int, extra: int) -> "_Order | None":
        """The kept order if it can tell the ``n`` lowest, else a new one of the ``n + extra`` lowest evictable
        experts; None when the policy's values cannot be kept (or ``extra`` is 0 and none is kept)."""
        order = self._current()
        if order is not None and order.covers(n):
            order.merge(self)
            return order
        if not extra:
            return None
        state = self._values_state()
        if state is None:
            return None
        slots, values = self._lowest(n + extra, strict=False, with_values=True)
        return _Order(state, slots, values + 1j * self._tick[slots], complete=len(slots) < n + extra)

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
        want = min(limit, n) - free
        order = None
        if want > 0:
            order = self._select(want, self.victim_lookahead)
            if order is None:
                victims, victim_values = self._lowest(want, strict=False, with_values=True)
            else:
                victims, victim_values = order.head(want)
        else:
            victims = victim_values = _NONE
            order = self._current()
        if not len(victims) or getattr(self.eviction, "always_admits", False):  # a prefix: free slots, victims
            considered = free + len(victims)
            chosen = np.arange(considered)
            taken = len(victims)
            spare = [self._free.pop() for _ in range(free)]
        else:
            # admission of every candidate over every victim, in one call; then a merge in urgency order
            # The first ``free`` candidates take the free slots; each later one goes over the lowest victim left
            # if admitted there, else is skipped; until the victims run out (there are at most limit - free).
            m = len(victims)
            chosen, taken, considered = list(range(free)), 0, n
            above = getattr(self.eviction, "admitted_above", None)
            if above is not None:  # admitted iff its value is above the victim's, which is at hand
                cand_values, victim_values = above(layers, experts).tolist(), victim_values.tolist()
                bar = victim_values[0]
                for i in range(free, n):
                    if cand_values[i] > bar:
                        chosen.append(i)
                        taken += 1
                        if taken == m:
                            considered = i + 1
                            break
                        bar = victim_values[taken]
            else:  # admission of every candidate over every victim, in one call
                ok = self.eviction.admits(np.repeat(layers, m), np.repeat(experts, m),
                                          np.tile(self._layer[victims], n),
                                          np.tile(self._expert[victims], n)).reshape(n, m).tolist()
                for i in range(free, n):
                    if ok[i][taken]:
                        chosen.append(i)
                        taken += 1
                        if taken == m:
                            considered = i + 1
                            break
            spare = [self._free.pop() for _ in range(free)]
            chosen = np.asarray(chosen, dtype=np.int64)
        if taken:
            spare.extend(self._evict(order.take(taken) if order is not None else victims[:taken]).tolist())
        if len(chosen):
            spare = np.asarray(spare, dtype=np.int64)
            self._load(layers[chosen], experts[chosen], spare, urgent=False)
            if order is not None:  # the prefetched experts can be evicted later
                order.pending.extend(spare.tolist())
        self._keep(order)
        return chosen, considered

    def _lowest(self, n: int, strict: bool = True, with_values: bool = False):
        """Slots of the ``n`` evictable experts the policy values least, in eviction order (fewer when fewer are
        evictable and not ``strict``); ``with_values``: also their values."""
        candidates = ((self._layer >= 0) > self._protected).nonzero()[0]  # resident and not protected
        if len(candidates) < n:
            if strict:
                raise RuntimeError("every cache slot is protected; acquire() takes at most num_slots experts")
            n = len(candidates)
            if not n:
                return (candidates, _NONE) if with_values else candidates
        values = self._values(candidates)
        order = lowest_first(values, self._tick[candidates], n)
        return (candidates[order], values[order]) if with_values else candidates[order]

    def _values(self, slots: np.ndarray) -> np.ndarray:
        """The eviction policy's values of the experts in ``slots``."""
        by_cell = getattr(self.eviction, "cell_values", None)
        if by_cell is not None:
            return by_cell(self._cell[slots])
        return self.eviction.values(self._layer[slots], self._expert[slots])

    def _evict(self, slots: np.ndarray) -> np.ndarray:
        """Empty ``slots``; returns them."""
        self._epoch += 1
        if len(slots) <= FEW:  # element by element: cheaper than a dozen array calls
            layer_of, expert_of, unused = self._layer, self._expert, self._unused_prefetch
            slot_of, resident, wasted = self.slot_of, self.resident_mask, self.stats.prefetches_wasted
            for s in slots.tolist():
                key = layer_of[s], expert_of[s]
                if unused[key]:
                    wasted[key[0]] += 1
                    unused[key] = False
                slot_of[key] = -1
                resident[key] = False
                layer_of[s] = -1
            return slots
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
        """Start copying ``experts`` (of ``layers``: one layer or one per expert) into ``slots``; a prefetch
        (not ``urgent``) is counted and marked unused until an acquisition uses it."""
        self._epoch += 1
        self.engine.load_many(slots, layers, experts, urgent)
        stats, slot_bytes, n = self.stats, self.store.layout.slot_bytes, len(slots)
        nbytes = stats.demand_bytes if urgent else stats.prefetch_bytes
        if n <= FEW:  # element by element: cheaper than a dozen array calls
            slot_list = slots.tolist()
            layer_list = [layers] * n if np.ndim(layers) == 0 else layers.tolist()
            slot_of, resident, layer_of, expert_of, cell, tick = (self.slot_of, self.resident_mask, self._layer,
                                                                  self._expert, self._cell, self._tick)
            unused, prefetches, clock, num_experts = self._unused_prefetch, stats.prefetches, self._clock, \
                self._num_experts
            for s, l, e in zip(slot_list, layer_list, experts.tolist()):
                slot_of[l, e] = s
                resident[l, e] = True
                layer_of[s] = l
                expert_of[s] = e
                cell[s] = l * num_experts + e
                nbytes[l] += slot_bytes
                clock += 1
                tick[s] = clock  # a new arrival counts as most recently used
                if not urgent:
                    unused[l, e] = True
                    prefetches[l] += 1
            self._clock = clock
            return
        if np.ndim(layers) == 0:
            nbytes[layers] += n * slot_bytes
        else:
            np.add.at(nbytes, layers, slot_bytes)
        self.slot_of[layers, experts] = slots
        self.resident_mask[layers, experts] = True
        self._layer[slots], self._expert[slots] = layers, experts
        self._cell[slots] = np.asarray(layers) * self._num_experts + experts
        self._touch(slots)  # a new arrival counts as most recently used
        if not urgent:
            self._unused_prefetch[layers, experts] = True
            np.add.at(stats.prefetches, layers, 1)


class _Order:
    """The lowest evictable experts in eviction order, carried from one victim selection to the next within a
    layer, so that a layer's demand fetches and its two prefetch pumps cost one selection over the slots instead
    of three.

    ``slots`` (with ``keys`` = value + 1j * tick, the order's key) are the lowest evictable experts when the
    order was made, less those evicted since; ``complete``: they were all the evictable ones. Experts that have
    become evictable since (a round's released slots, arrived prefetches) wait in ``pending`` and are merged in
    at the next selection. Every evictable expert outside both ranks above every one in ``slots``, so while
    ``slots`` holds at least ``n`` (or all of them), its merge with ``pending`` gives the ``n`` lowest exactly.
    Valid only while nothing else changes (the cache's epoch) and the policy's values stay (``state``)."""

    __slots__ = ("state", "slots", "keys", "complete", "pending", "epoch")

    def __init__(self, state, slots: np.ndarray, keys: np.ndarray, complete: bool):
        self.state, self.slots, self.keys, self.complete = state, slots, keys, complete
        self.pending: list[int] = []
        self.epoch = -1

    def covers(self, n: int) -> bool:
        return self.complete or len(self.slots) >= n

    def merge(self, cache: ExpertCache) -> None:
        if not self.pending:
            return
        p = np.asarray(self.pending, dtype=np.int64)
        self.pending = []
        values = cache._values(p)
        slots = np.concatenate([self.slots, p])
        keys = np.concatenate([self.keys, values + 1j * cache._tick[p]])
        order = np.argsort(keys)
        self.slots, self.keys = slots[order], keys[order]

    def head(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` lowest (fewer if fewer) and their values."""
        return self.slots[:n], self.keys[:n].real

    def take(self, n: int) -> np.ndarray:
        """Remove and return the ``n`` lowest (they are being evicted)."""
        taken, self.slots, self.keys = self.slots[:n], self.slots[n:], self.keys[n:]
        return taken
