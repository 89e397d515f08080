"""Custom Prometheus metrics through Triton's ``pb_utils.MetricFamily``, updated off the engine's path.

Every metric call is an IPC round trip to the server, so updates are queued and applied by one thread.
"""

from __future__ import annotations

import queue
import threading

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
        self._labels = labels
        self._outcomes: dict[str, object] = {}
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
        for name in ("prompt_tokens", "generated_tokens", "ttft", "itl", "batch", "step_seconds"):
            setattr(self, name, None)
        self._families.clear()
