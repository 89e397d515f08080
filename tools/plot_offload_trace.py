"""Plot an expert-offloading trace (the file a model with ``expert_trace_path`` writes) and print its totals.

    python -m tritonmoe.tools.plot_offload_trace /tmp/offload_trace.jsonl --out trace.png

Four panels: the hit rate and the stall of each engine step over time, and per MoE layer the hit rate and the
bytes moved (on demand / by prefetch). Totals (printed as JSON): hit rate, prefetch precision and recall, bytes
moved, stall and host time per step -- the same definitions as ``Offloader.stats()``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from tritonmoe.backend.offload.stats import rates
from tritonmoe.backend.offload.trace_file import FIELDS, read_trace


def summarize(path: str) -> tuple[dict, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Totals of the file's last run, the per-step per-layer arrays ``[steps, layers]``, step times and times."""
    header, steps = read_trace(path)
    layers = header["layers"]
    # a field the file's writer did not have yet (an older trace) reads as zeros
    arrays = {name: np.array([s.get(name, [0] * layers) for s in steps], dtype=float).reshape(len(steps), layers)
              for name in FIELDS}
    step_s = np.array([s["step_s"] for s in steps], dtype=float)
    t = np.array([s["t"] for s in steps], dtype=float)
    tot = {name: float(a.sum()) for name, a in arrays.items()}
    n = max(len(steps), 1)
    totals = {"model": header.get("model", ""), "steps": len(steps), "layers": layers,
              "uses": int(tot["uses"]), **rates(tot),
              "bytes_moved": int(tot["demand_bytes"] + tot["prefetch_bytes"]), "disk_bytes": int(tot["disk_bytes"]),
              "stall_ms_per_step": 1e3 * tot["stall_s"] / n, "host_ms_per_step": 1e3 * tot["host_s"] / n,
              "step_ms_mean": 1e3 * float(step_s.mean()) if len(steps) else 0.0}
    return totals, arrays, step_s, t


def plot(path: str, out: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    totals, a, step_s, t = summarize(path)
    if not totals["steps"]:
        raise ValueError(f"{path}: the trace has a header but no steps yet")
    fig, ax = plt.subplots(2, 2, figsize=(12, 7))
    uses = a["uses"].sum(1)
    hit = np.divide(a["hits"].sum(1), uses, out=np.full(len(uses), np.nan), where=uses > 0)
    ax[0, 0].plot(t, hit, ".", ms=3)
    ax[0, 0].set(title="hit rate per engine step", xlabel="s since the trace began", ylim=(-0.02, 1.02))
    ax[0, 1].plot(t, 1e3 * a["stall_s"].sum(1), ".", ms=3, label="stall")
    ax[0, 1].plot(t, 1e3 * step_s, ".", ms=3, label="whole step")
    ax[0, 1].set(title="time per engine step", xlabel="s since the trace began", ylabel="ms")
    ax[0, 1].legend()
    layer_uses = a["uses"].sum(0)
    layer_hit = np.divide(a["hits"].sum(0), layer_uses, out=np.zeros(len(layer_uses)), where=layer_uses > 0)
    x = np.arange(totals["layers"])
    ax[1, 0].bar(x, layer_hit)
    ax[1, 0].set(title="hit rate per MoE layer", xlabel="MoE layer", ylim=(0, 1))
    ax[1, 1].bar(x, a["demand_bytes"].sum(0) / 2**20, label="on demand")
    ax[1, 1].bar(x, a["prefetch_bytes"].sum(0) / 2**20, bottom=a["demand_bytes"].sum(0) / 2**20, label="prefetch")
    ax[1, 1].set(title="bytes moved per MoE layer", xlabel="MoE layer", ylabel="MiB")
    ax[1, 1].legend()
    for panel in ax[1]:
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{totals['model']}: {totals['steps']} steps, hit rate {totals['hit_rate']:.3f}, prefetch "
                 f"precision {totals['prefetch_precision']:.2f} / recall {totals['prefetch_recall']:.2f}, "
                 f"stall {totals['stall_ms_per_step']:.2f} ms/step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return totals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="the JSON-lines file written through expert_trace_path")
    p.add_argument("--out", help="PNG to write (default: only print the totals)")
    a = p.parse_args(argv)
    try:
        totals = plot(a.trace, a.out) if a.out else summarize(a.trace)[0]
    except (OSError, ValueError) as e:
        print(f"plot_offload_trace: {e}", file=sys.stderr)
        return 2
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
