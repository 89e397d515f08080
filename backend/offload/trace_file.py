"""The expert cache's activity as a trace file: one JSON line per engine step, per MoE layer, what changed since the
previous line (uses, hits, misses, prefetches issued / used / wasted, bytes moved on demand and by prefetch, stall
and host seconds), plus the step's wall time and batch size. ``tools/plot_offload_trace.py`` plots it.

Turned on by the model parameter ``expert_trace_path`` (a file; appended to, so a reload continues it). Written on
the engine thread between forwards, the only place the offloader's counters are consistent. The first line of a
run says what the fields are and which model wrote it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .stats import FIELDS


class OffloadTraceWriter:
    def __init__(self, path: str | Path, num_layers: int, model: str = "", **header):
        self.path = Path(path)
        self._file = self.path.open("a", buffering=1)  # line-buffered: a reader sees whole steps as they happen
        self._last = {name: np.zeros(num_layers) for name in FIELDS}
        self._start = time.monotonic()
        self._step = 0
        self._write({"trace": "tritonmoe.offload", "version": 1, "model": model, "layers": num_layers,
                     "fields": list(FIELDS), "started": time.time(), **header})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def step(self, running: int, seconds: float, stats: dict) -> None:
        """One engine step: ``stats`` is ``Offloader.stats()`` taken after it (totals since the offloader began)."""
        self._step += 1
        per_layer = stats["per_layer"]
        record = {"step": self._step, "t": round(time.monotonic() - self._start, 6), "running": running,
                  "step_s": round(seconds, 6)}
        for name in FIELDS:
            now = np.asarray(per_layer[name], dtype=float)
            delta = now - self._last[name]
            self._last[name] = now
            record[name] = ([round(float(x), 7) for x in delta] if name.endswith("_s")
                            else [int(x) for x in delta])
        self._write(record)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_trace(path: str | Path) -> tuple[dict, list[dict]]:
    """The header of the last run in the file and that run's step records."""
    header, steps = None, []
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if record.get("trace") == "tritonmoe.offload":
                header, steps = record, []
            elif header is None:
                raise ValueError(f"{path}:{n}: a step before any header line; not an offload trace file")
            else:
                steps.append(record)
    if header is None:
        raise ValueError(f"{path}: no offload trace header (is this a file written by expert_trace_path?)")
    return header, steps
