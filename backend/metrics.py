"""Custom Prometheus metrics through Triton's ``pb_utils.MetricFamily``, updated off the engine's path.

Every metric call is an IPC round trip to the server, so updates are queued and applied by one thread.
"""

from __future__ import annotations

import queue
import threading

OFFLOAD_COUNTERS = {  # OffloadStats per-layer counter -> (metric, help)
    "uses": ("tritonmoe_expert_uses_total", "Expert uses (one per expert per layer per step)"),
    "hits": ("tritonmoe_expert_cache_hits_total", "Expert uses found in the device cache or already in flight"),
    "misses": ("tritonmoe_expert_cache_misses_total", "Expert uses fetched on demand from the host tier"),
    "prefetches": ("tritonmoe_expert_prefetches_total", "Experts prefetched"),
    "prefetches_used": ("tritonmoe_expert_prefetches_used_total", "Prefetched experts used before eviction"),
    "demand_bytes": ("tritonmoe_expert_demand_bytes_total", "Bytes copied host->device on demand"),
    "prefetch_bytes": ("tritonmoe_expert_prefetch_bytes_total", "Bytes copied host->device by prefetching"),
    "disk_bytes": ("tritonmoe_expert_disk_read_bytes_total",
                   "Disk tier: bytes of copied experts that were not in the page cache (read from disk)"),
    "stall_s": ("tritonmoe_expert_stall_seconds_total", "Time the computation waited for expert data"),
}
OFFLOAD_RATES = {
    "hit_rate": ("tritonmoe_expert_hit_rate", "Share of expert uses served from the device cache"),
    "prefetch_precision": ("tritonmoe_expert_prefetch_precision", "Share of prefetched experts that were used"),
    "prefetch_recall": ("tritonmoe_expert_prefetch_recall", "Share of host-tier uses a prefetch brought in"),
}
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class TritonMetrics:
    def __init__(self, pb_utils, model: str, version: str):
        mf = pb_utils.MetricFamily
        labels = {"model": model, "version": version}
        self._families = {
            "requests": mf("tritonmoe_requests_total", "Requests finished, by outcome", mf.COUNTER),
            "prompt": mf("tritonmoe_prompt_tokens_total", "Prompt tokens processed", mf.COUNTER),
            "generated": mf("tritonmoe_generation_tokens_total", "Tokens generated", mf.COUNTER),
            "ttft": mf("tritonmoe_time_to_first_token_seconds", "Time to first token", mf.HISTOGRAM),
            "itl": mf("tritonmoe_inter_token_latency_seconds", "Time between tokens of a request", mf.HISTOGRAM),
            "batch": mf("tritonmoe_running_sequences", "Sequences in the running batch", mf.GAUGE),
            "step": mf("tritonmoe_engine_step_seconds", "Duration of one engine step", mf.HISTOGRAM),
        }
        self._mf = mf
        self._labels = labels
        self._outcomes: dict[str, object] = {}
        self._keep: list = []  # Metric objects made after start-up (start-up phases, offloading)
        f = self._families
        self.prompt_tokens = f["prompt"].Metric(labels=labels)
        self.generated_tokens = f["generated"].Metric(labels=labels)
        self.ttft = f["ttft"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.itl = f["itl"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.batch = f["batch"].Metric(labels=labels)
        self.step_seconds = f["step"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self._updates: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._apply, name="tritonmoe-metrics", daemon=True)
        self._thread.start()

    def startup(self, phases: dict[str, float]) -> None:
        """Seconds of each start-up phase (weights, offload_setup, tokenizer, ...) as a gauge per phase."""
        family = self._families.setdefault(
            "startup", self._mf("tritonmoe_startup_seconds", "Duration of each model start-up phase", self._mf.GAUGE))
        for phase, seconds in phases.items():
            self._keep.append(metric := family.Metric(labels={**self._labels, "phase": phase}))
            metric.set(seconds)

    def request_finished(self, outcome: str) -> None:
        self._updates.put(("outcome", outcome))

    def update(self, fn, *args) -> None:
        """Queue ``fn(*args)`` (a bound Metric method) for the metrics thread."""
        self._updates.put((fn, args))

    def _apply(self) -> None:
        while (item := self._updates.get()) is not None:
            fn, args = item
            if fn == "outcome":
                if args not in self._outcomes:
                    self._outcomes[args] = self._families["requests"].Metric(
                        labels={**self._labels, "outcome": args})
                self._outcomes[args].increment(1)
            else:
                fn(*args)

    def close(self) -> None:
        self._updates.put(None)
        self._thread.join(10)
        # Triton requires Metric objects to go before their families.
        self._outcomes.clear()
        self._keep.clear()
        self.offload = None
        for name in ("prompt_tokens", "generated_tokens", "ttft", "itl", "batch", "step_seconds"):
            setattr(self, name, None)
        self._families.clear()


class OffloadMetrics:
    """The expert cache's counters per MoE layer and its rates, exported from ``Offloader.stats()`` snapshots.

    Counters take the difference between snapshots, so a snapshot can be taken whenever convenient."""

    def __init__(self, metrics: TritonMetrics, num_layers: int):
        mf, labels = metrics._mf, metrics._labels
        self._metrics = metrics
        self._counters = {}
        for key, (name, help_text) in OFFLOAD_COUNTERS.items():
            family = metrics._families.setdefault(name, mf(name, help_text, mf.COUNTER))
            self._counters[key] = [family.Metric(labels={**labels, "layer": str(i)}) for i in range(num_layers)]
        self._rates = {}
        for key, (name, help_text) in OFFLOAD_RATES.items():
            family = metrics._families.setdefault(name, mf(name, help_text, mf.GAUGE))
            self._rates[key] = family.Metric(labels=labels)
        self._last = {key: [0] * num_layers for key in OFFLOAD_COUNTERS}

    def publish(self, stats: dict) -> None:
        for key, per_layer in stats["per_layer"].items():
            if key not in self._counters:
                continue
            for layer, value in enumerate(per_layer):
                delta = value - self._last[key][layer]
                if delta > 0:
                    self._metrics.update(self._counters[key][layer].increment, delta)
            self._last[key] = list(per_layer)
        for key, metric in self._rates.items():
            self._metrics.update(metric.set, stats[key])
