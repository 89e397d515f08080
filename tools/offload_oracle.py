"""How few experts any cache could move: Belady's MIN on the offloading benchmark's replayed routing.

With the copy link saturated (batch 8 on the H200: time per token = the bytes moved / 55 GB/s, within ~10%), a
prefetch does not make an expert free, it only moves it earlier on the same link; what lowers the bytes is what
the cache *keeps*. MIN -- evict the resident expert whose next use is farthest away -- keeps the most (it reads the
future, so no real policy can), and its misses are a floor on the experts any policy, prefetching or not, must
copy per step. That floor times the expert size over the link's bandwidth is a transfer bound every policy faces,
unlike ``(1 - hit rate) x bytes / bandwidth``, which counts a prefetched expert as free.

The sequence replayed is the benchmark's own (``bench_offload.groups_for``, the same warm-up group, prefill then
decode, one cache across groups); each MoE layer's experts must be resident together (a layer's union is one
request to the cache; one needing more than the cache holds runs in rounds, resident experts first, as the
offloader runs it). LRU on the same sequence is computed too: it must equal the real cache's LRU replay (a test
holds them together).

    python -m tritonmoe.tools.offload_oracle --traces runs/routing/gpu/qwen3.npz --batch 1 8 --budgets 10 25 50 \
        --slot-mib 9 --gbps 55.3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass

import numpy as np

from tritonmoe.backend.offload.config import ExpertBudget
from tritonmoe.tools.train_routing import Traces

NEVER = np.iinfo(np.int64).max


@dataclass
class Sequence:
    """The cache requests in order: per request the cells ``layer * E + expert`` a MoE layer needs together, and
    whether it is a counted (measured) decode step."""

    cells: list[np.ndarray]
    counted: list[bool]
    num_cells: int


def schedule(group: list[int], steps: int, gap: int):
    """One group's forwards as the serving engine runs them: ``("prefill", [r, ...])``, ``("decode", [(r, t),
    ...])`` (request ``r``'s decode step ``t``), ``("end", [r, ...])``. ``gap`` 0: the group prefills in one forward
    and decodes in lockstep (the benchmark's batches). ``gap`` g: continuous batching -- request j joins once j x g
    decode steps have run, in a prefill of its own (as ``backend.engine`` prefills each admitted request) between
    the others' decode steps, and leaves after its ``steps`` tokens."""
    if not gap:
        yield "prefill", list(group)
        for t in range(steps):
            yield "decode", [(r, t) for r in group]
        yield "end", list(group)
        return
    pending, running, step = list(group), [], 0
    while pending or running:
        if pending and step >= gap * (len(group) - len(pending)):
            r = pending.pop(0)
            yield "prefill", [r]
            if steps > 0:
                running.append([r, 0])
            else:
                yield "end", [r]
        if running:
            yield "decode", [(r, t) for r, t in running]
            for seq in running:
                seq[1] += 1
            done = [r for r, t in running if t >= steps]
            if done:
                running = [seq for seq in running if seq[1] < steps]
                yield "end", done
        step += 1


def forward_experts(traces: Traces, kind: str, rows) -> np.ndarray:
    """The replayed experts ``[B, L, T, k]`` of one forward of :func:`schedule`: T the prompt for a ``"prefill"``
    of requests ``rows``, the one token for a ``"decode"`` of ``(r, t)`` rows. int64: trace files store ids as
    uint8, where ``layer * E + id`` would overflow."""
    P = traces.prompt_len
    if kind == "prefill":
        return traces.experts[rows, :, :P].astype(np.int64)
    return np.stack([traces.experts[r, :, P + t] for r, t in rows]).astype(np.int64)[:, :, None]


def replay_sequence(traces: Traces, groups: list[list[int]], new_tokens: int, warmup: int,
                    warmup_tokens: int | None, gap: int = 0) -> Sequence:
    """What the benchmark's replay asks of the cache, forward by forward as :func:`schedule` orders them (``gap``
    0: each group's prefill, every layer the union over its prompts, then its decode steps, the union over its
    sequences); warm-up groups run ``warmup_tokens`` steps and are not counted."""
    L, E = traces.layers, traces.num_experts
    cells, counted = [], []
    for gi, group in enumerate(groups):
        measured = gi >= warmup
        steps = new_tokens if measured or warmup_tokens is None else min(new_tokens, warmup_tokens)
        for kind, rows in schedule(group, steps, gap):
            if kind == "end":
                continue
            routes = forward_experts(traces, kind, rows)  # [B, L, T, k]
            for layer in range(L):
                cells.append(np.unique(routes[:, layer]) + layer * E)
                counted.append(measured and kind == "decode")
    return Sequence(cells, counted, L * E)


def _next_uses(seq: Sequence) -> list[np.ndarray]:
    """Per request, the index of the next request that needs each of its cells again (``NEVER`` if none)."""
    seen = np.full(seq.num_cells, NEVER, dtype=np.int64)
    out = [None] * len(seq.cells)
    for t in range(len(seq.cells) - 1, -1, -1):
        c = seq.cells[t]
        out[t] = seen[c].copy()
        seen[c] = t
    return out


def simulate(seq: Sequence, capacity: int, policy: str) -> dict:
    """Demand-only cache of ``capacity`` experts under ``policy`` (``"min"``: farthest next use first; ``"lru"``:
    least recently used first). Returns uses and hits over the counted requests."""
    if policy not in ("min", "lru"):
        raise ValueError(f"policy must be 'min' or 'lru', not {policy!r}")
    resident = np.zeros(seq.num_cells, dtype=bool)
    # evicted highest first: MIN -> the next use (farther goes sooner); LRU -> minus the last use's tick, ticks
    # handed out as the cache does (a layer's resident experts, then its missing ones, each by expert id)
    key = np.zeros(seq.num_cells, dtype=np.int64)
    needed = np.zeros(seq.num_cells, dtype=bool)
    next_uses = _next_uses(seq) if policy == "min" else None
    count = tick = uses = hits = 0
    for t, cells in enumerate(seq.cells):
        nxt = next_uses[t] if policy == "min" else None
        if len(cells) > capacity:
            # more than the cache holds: the offloader runs rounds of at most ``capacity``, resident ones first
            first = np.argsort(~resident[cells], kind="stable")
            cells, nxt = cells[first], (nxt[first] if nxt is not None else None)
        for start in range(0, len(cells), capacity):
            part = cells[start:start + capacity]
            hit = resident[part]
            if seq.counted[t]:
                uses += len(part)
                hits += int(hit.sum())
            missing = part[~hit]
            evict = count + len(missing) - capacity
            if evict > 0:
                needed[part] = True
                candidates = np.flatnonzero(resident & ~needed)
                needed[part] = False
                victims = candidates[np.argpartition(-key[candidates], evict - 1)[:evict]]
                resident[victims] = False
                count -= evict
            resident[missing] = True
            count += len(missing)
            if policy == "min":
                key[part] = nxt[start:start + capacity]
            else:
                order = np.concatenate([part[hit], missing])
                key[order] = -np.arange(tick + 1, tick + 1 + len(order))
                tick += len(order)
    return {"uses": uses, "hits": hits, "hit_rate": hits / uses if uses else 0.0}


def min_moved_per_step(traces: Traces, groups: list[list[int]], new_tokens: int, warmup: int,
                       warmup_tokens: int | None, capacity: int, gap: int = 0) -> float:
    """Experts Belady's MIN copies per counted decode step of the benchmark's replay: no policy copies fewer."""
    seq = replay_sequence(traces, groups, new_tokens, warmup, warmup_tokens, gap)
    r = simulate(seq, capacity, "min")
    return (r["uses"] - r["hits"]) / max(1.0, sum(seq.counted) / traces.layers)


def oracle_rows(traces: Traces, batches, budgets, new_tokens: int, warmup: int, warmup_tokens: int | None,
                groups_b1: int, groups_bn: int, slot_bytes: int | None, gbps: float | None,
                gap: int = 0) -> list[dict]:
    from tritonmoe.tools.bench_offload import groups_for

    rows = []
    L, E = traces.layers, traces.num_experts
    for batch in batches:
        groups = groups_for(traces, batch, warmup + (groups_b1 if batch == 1 else groups_bn))
        seq = replay_sequence(traces, groups, new_tokens, warmup, warmup_tokens, gap if batch > 1 else 0)
        steps = sum(seq.counted) / L
        for budget in budgets:
            capacity = ExpertBudget.parse(f"{budget}%").slots(1, L * E)
            row = {"batch": batch, "budget_pct": budget, "num_slots": capacity, "decode_steps": steps,
                   "decode_uses_per_step": 0.0}
            for policy in ("min", "lru"):
                r = simulate(seq, capacity, policy)
                row["decode_uses_per_step"] = r["uses"] / steps
                row[f"{policy}_decode_hit_rate"] = r["hit_rate"]
                row[f"{policy}_moved_per_step"] = (r["uses"] - r["hits"]) / steps
            if slot_bytes and gbps:
                row["min_transfer_ms"] = 1e3 * row["min_moved_per_step"] * slot_bytes / (gbps * 1e9)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", required=True, help="a trace file of tools/train_routing")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="groups replayed first and not counted")
    p.add_argument("--warmup-tokens", type=int, default=4, help="decode steps of the warm-up groups")
    p.add_argument("--groups-b1", type=int, default=4)
    p.add_argument("--groups-bn", type=int, default=1)
    p.add_argument("--arrival-gap", type=int, default=0, metavar="STEPS",
                   help="batch > 1: requests join every STEPS decode steps, each prefilled alone (bench_offload's "
                   "continuous-batching replay); 0: lockstep batches")
    p.add_argument("--slot-mib", type=float, default=None, help="bytes per expert, MiB: report the transfer floor")
    p.add_argument("--gbps", type=float, default=None, help="host-to-device bandwidth, GB/s, for the floor")
    p.add_argument("--out", default=None)
    p.add_argument("--bench", default=None, help="a bench_offload result file on these traces (same --batch, "
                   "--new-tokens, --warmup-tokens, --groups-*): plot its time per token beside its copies' time and "
                   "MIN's floor, batch > 1 (--plot)")
    p.add_argument("--plot", default=None, help="figure path for --bench")
    a = p.parse_args(argv)
    traces = Traces(a.traces)
    slot_bytes = int(a.slot_mib * 2**20) if a.slot_mib else None
    rows = oracle_rows(traces, a.batch, a.budgets, a.new_tokens, a.warmup, a.warmup_tokens, a.groups_b1,
                       a.groups_bn, slot_bytes, a.gbps, a.arrival_gap)
    env = {"command": "python -m tritonmoe.tools.offload_oracle " + " ".join(argv if argv is not None else
                                                                           __import__("sys").argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "host": platform.node(),
           "traces": a.traces, "layers": traces.layers, "experts": traces.num_experts, "top_k": traces.top_k}
    print(json.dumps(env))
    print("| batch | budget | slots | uses/step | MIN hit | MIN moved/step | LRU hit | LRU moved/step |"
          + (" MIN transfer ms |" if slot_bytes and a.gbps else ""))
    for r in rows:
        print(f"| {r['batch']} | {r['budget_pct']}% | {r['num_slots']} | {r['decode_uses_per_step']:.1f} | "
              f"{r['min_decode_hit_rate']:.3f} | {r['min_moved_per_step']:.1f} | {r['lru_decode_hit_rate']:.3f} | "
              f"{r['lru_moved_per_step']:.1f} |" + (f" {r['min_transfer_ms']:.1f} |" if "min_transfer_ms" in r else ""))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=1)
    if a.bench and a.plot:
        print("plot: " + plot_floor(json.load(open(a.bench)), rows, a.plot))
    return 0


def plot_floor(bench: dict, rows: list[dict], path: str) -> str:
    """Per policy of ``bench`` at batch > 1: time per token, the time its copies take at the run's measured H2D
    bandwidth (demand and prefetch bytes), and MIN's floor (the fewest copies any cache makes, same bandwidth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gbps = bench["env"]["h2d"]["pinned_GBps"]
    floor = {(r["batch"], r["budget_pct"]): r["min_moved_per_step"] for r in rows}
    runs = [r for r in bench["results"] if r["batch"] > 1 and r["policy"] != "resident"
            and (r["batch"], r["budget_pct"]) in floor]
    if not runs:
        raise ValueError("no batch > 1 rows of the bench file match the oracle's batches and budgets")
    fig, ax = plt.subplots(figsize=(1.6 * len(runs) + 2, 4.5))
    x = np.arange(len(runs))
    moved = [1e3 * (r["decode_demand_bytes_per_step"] + r["decode_prefetch_bytes_per_step"]) / (gbps * 1e9)
             for r in runs]
    mins = [1e3 * floor[(r["batch"], r["budget_pct"])] * r["slot_bytes"] / (gbps * 1e9) for r in runs]
    ax.bar(x - 0.27, [1e3 * r["tpot_s"] for r in runs], 0.27, label="time per output token")
    ax.bar(x, moved, 0.27, label=f"its copies at {gbps:.1f} GB/s")
    ax.bar(x + 0.27, mins, 0.27, label="MIN's copies (no cache does fewer)")
    ax.set_xticks(x, [f"{r['policy']}\nB={r['batch']} {r['budget_pct']}%" for r in runs], fontsize=7)
    ax.set_ylabel("ms per decode step")
    shape = runs[0].get("shape", "")
    ax.set_title(f"{shape}: where a batch's decode step goes ({bench['env'].get('device', '')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
