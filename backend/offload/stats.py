"""Counters of the expert cache, per MoE layer, and the rates derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field

_COUNTERS = ("uses", "hits", "misses", "prefetches", "prefetches_used", "prefetches_wasted",
             "demand_bytes", "prefetch_bytes")


@dataclass
class OffloadStats:
    """``uses`` = expert uses (a batch step's union of one layer's experts counts each expert once);
    ``hits`` found it in the cache (resident, or a prefetch already under way); ``misses`` fetched it on demand;
    ``prefetches_used`` / ``prefetches_wasted``: prefetched experts used at least once / evicted unused;
    ``stall_s``: time the computation waited for expert data; ``host_s``: CPU time the offloader spent per layer
    after reading the routing back (bookkeeping, prediction, issuing copies and kernels) -- on a GPU the device
    idles for part of it, since the next layer's work is issued only after."""

    num_layers: int
    uses: list[int] = field(default_factory=list)
    hits: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    prefetches: list[int] = field(default_factory=list)
    prefetches_used: list[int] = field(default_factory=list)
    prefetches_wasted: list[int] = field(default_factory=list)
    demand_bytes: list[int] = field(default_factory=list)
    prefetch_bytes: list[int] = field(default_factory=list)
    stall_s: list[float] = field(default_factory=list)
    host_s: list[float] = field(default_factory=list)

    def __post_init__(self):
        for name in _COUNTERS:
            setattr(self, name, [0] * self.num_layers)
        self.stall_s = [0.0] * self.num_layers
        self.host_s = [0.0] * self.num_layers

    def as_dict(self) -> dict:
        """Totals, rates and per-layer lists. Rates with an empty denominator are 0.0, never NaN."""
        total = {name: sum(getattr(self, name)) for name in _COUNTERS}
        total["stall_s"] = sum(self.stall_s)
        total["host_s"] = sum(self.host_s)
        out = dict(total)
        out["bytes_moved"] = total["demand_bytes"] + total["prefetch_bytes"]
        out["hit_rate"] = _ratio(total["hits"], total["uses"])
        # precision: of the prefetches whose fate is known (used, or evicted unused), the share that was used
        out["prefetch_precision"] = _ratio(total["prefetches_used"],
                                           total["prefetches_used"] + total["prefetches_wasted"])
        # recall: of the uses that needed a host transfer, the share a prefetch had already brought in
        out["prefetch_recall"] = _ratio(total["prefetches_used"], total["prefetches_used"] + total["misses"])
        out["per_layer"] = {name: list(getattr(self, name)) for name in (*_COUNTERS, "stall_s", "host_s")}
        return out


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0
