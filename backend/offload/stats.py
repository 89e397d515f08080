"""Counters of the expert cache, per MoE layer, and the rates derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_COUNTERS = ("uses", "hits", "misses", "prefetches", "prefetches_used", "prefetches_wasted",
             "demand_bytes", "prefetch_bytes", "disk_bytes")
FIELDS = _COUNTERS + ("stall_s", "host_s")  # every per-layer quantity :class:`OffloadStats` keeps


@dataclass
class OffloadStats:
    """``uses`` = expert uses (a batch step's union of one layer's experts counts each expert once);
    ``hits`` found it in the cache (resident, or a prefetch already under way); ``misses`` fetched it on demand;
    ``prefetches_used`` / ``prefetches_wasted``: prefetched experts used at least once / evicted unused;
    ``stall_s``: time the computation waited for expert data; ``host_s``: CPU time the offloader spent per layer
    after reading the routing back (bookkeeping, prediction, issuing copies and kernels) -- on a GPU the device
    idles for part of it, since the next layer's work is issued only after."""

    num_layers: int
    uses: np.ndarray = field(default=None)
    hits: np.ndarray = field(default=None)
    misses: np.ndarray = field(default=None)
    prefetches: np.ndarray = field(default=None)
    prefetches_used: np.ndarray = field(default=None)
    prefetches_wasted: np.ndarray = field(default=None)
    demand_bytes: np.ndarray = field(default=None)
    prefetch_bytes: np.ndarray = field(default=None)
    disk_bytes: np.ndarray = field(default=None)  # disk tier: bytes of copied experts not in the page cache
    stall_s: np.ndarray = field(default=None)
    host_s: np.ndarray = field(default=None)

    def __post_init__(self):
        # numpy arrays, so the cache can count a whole layer's (or a batch's) events in one operation
        for name in _COUNTERS:
            setattr(self, name, np.zeros(self.num_layers, dtype=np.int64))
        self.stall_s = np.zeros(self.num_layers)
        self.host_s = np.zeros(self.num_layers)

    def add_disk_bytes(self, layers, missing: np.ndarray | None) -> None:
        """``missing[i]``: bytes of expert ``i`` of a batch (MoE layer ``layers`` or ``layers[i]``) read from disk."""
        if missing is None:
            return
        if np.ndim(layers):
            np.add.at(self.disk_bytes, layers, missing)
        else:
            self.disk_bytes[layers] += int(missing.sum())

    def as_dict(self) -> dict:
        """Totals, rates and per-layer lists (plain Python numbers). Rates with an empty denominator are 0.0,
        never NaN."""
        total = {name: int(getattr(self, name).sum()) for name in _COUNTERS}
        total["stall_s"] = float(self.stall_s.sum())
        total["host_s"] = float(self.host_s.sum())
        out = dict(total)
        out["bytes_moved"] = total["demand_bytes"] + total["prefetch_bytes"]
        out.update(rates(total))
        out["per_layer"] = {name: getattr(self, name).tolist() for name in FIELDS}
        return out


def rates(total: dict) -> dict:
    """Hit rate, prefetch precision and recall of counter totals (any mapping with the counters' names)."""
    return {"hit_rate": _ratio(total["hits"], total["uses"]),
            # precision: of the prefetches whose fate is known (used, or evicted unused), the share that was used
            "prefetch_precision": _ratio(total["prefetches_used"],
                                         total["prefetches_used"] + total["prefetches_wasted"]),
            # recall: of the uses that needed a host transfer, the share a prefetch had already brought in
            "prefetch_recall": _ratio(total["prefetches_used"], total["prefetches_used"] + total["misses"])}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0
