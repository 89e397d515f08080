"""The routing-trace tool: a few training steps on real local text, a trace file of the right shape and contents,
and skew statistics that tell learned-like skew from uniform routing."""

from __future__ import annotations

import numpy as np
import pytest

from tritonmoe.tools import train_routing as tr

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    cfg = tr.TrainConfig(layers=3, experts=8, top_k=2, shared_experts=1, hidden=32, heads=2, expert_ffn=16,
                         vocab=512, context=64, batch=4, max_steps=3, requests=12, prompt_len=48, gen_len=8,
                         corpus_mb=1.5)
    corpus = tr.prepare_corpus(cfg, root / "corpus.npz", log=lambda s: None)
    meta = tr.train_and_trace(cfg, corpus, root / "traces.npz", log=lambda s: None)
    return tr.Traces(root / "traces.npz"), meta, cfg


def test_trace_file_shape_and_contents(traces):
    t, meta, cfg = traces
    assert meta["train_steps"] == 3 and len(meta["curve"]) >= 1
    R = t.requests
    assert 1 <= R <= cfg.requests
    assert t.experts.shape == (R, cfg.layers, cfg.prompt_len + cfg.gen_len, cfg.top_k)
    assert t.lookahead.shape == (R, cfg.layers - 1, cfg.gen_len, cfg.top_k)
    assert t.lookahead_prefill.shape == (R, cfg.layers - 1, cfg.experts)
    assert t.experts.max() < cfg.experts
    # top-k picks distinct experts per token (stored sorted)
    assert (np.diff(t.experts.astype(int), axis=-1) > 0).all()
    # the prompt's lookahead counts are k picks per prompt token
    assert (t.lookahead_prefill.sum(axis=-1) == cfg.prompt_len * cfg.top_k).all()
    assert set(t.split) <= {"eamc", "eval"} and set(t.category) <= set(tr.CATEGORIES)
    eam = t.eam(0)
    assert eam.shape == (2, cfg.layers, cfg.experts)
    assert (eam[0].sum(axis=1) == cfg.prompt_len * cfg.top_k).all()
    assert (eam[1].sum(axis=1) == cfg.gen_len * cfg.top_k).all()


def test_held_out_documents_never_train():
    docs = [("python", f"/x/{i}.py", "") for i in range(600)]
    held = [p for _, p, _ in docs if tr.is_held_out(p)]
    assert 0.1 < len(held) / len(docs) < 0.25  # one in six, stable
    assert held == [p for _, p, _ in docs if tr.is_held_out(p)]


def test_skew_statistics_separate_skewed_from_uniform(traces):
    t, _, cfg = traces
    uniform = tr.uniform_like(t.experts, t.num_experts)
    assert uniform.shape == t.experts.shape
    s_uniform = tr.skew_stats(uniform, t.prompt_len, t.num_experts, batch=4)
    # routing where every request uses the same two experts per layer: maximal skew, full reuse
    fixed = np.zeros_like(t.experts)
    fixed[..., 1] = 1
    s_fixed = tr.skew_stats(fixed, t.prompt_len, t.num_experts, batch=4)
    E = t.num_experts
    assert s_fixed["touched_per_request_decode"] == pytest.approx(2 / E)
    assert s_fixed["touched_per_batch_decode"] == pytest.approx(2 / E)
    assert s_fixed["decode_reuse_within_request"] == pytest.approx(1 - 1 / cfg.gen_len)
    assert s_fixed["decode_reuse_incl_prompt"] == pytest.approx(1.0)
    assert s_fixed["clusters_cos0.7"] == 1
    assert s_uniform["touched_per_request_decode"] > s_fixed["touched_per_request_decode"]
    assert s_uniform["normalised_entropy_all_requests"] > 0.9 > s_fixed["normalised_entropy_all_requests"]
    learned = tr.skew_stats(t.experts, t.prompt_len, t.num_experts, batch=4)
    for key in ("touched_per_request_decode", "decode_reuse_within_request", "top10pct_share_all_requests"):
        assert 0.0 <= learned[key] <= 1.0


@pytest.mark.parametrize("shape", ["dsv2lite", "qwen3"])
def test_benchmark_harness_replays_traces_through_every_policy(traces, tmp_path, shape):
    """The benchmark on the CPU with tiny widths: the trace's routing drives the real offloader for every policy;
    the all-resident baseline moves nothing, the on-demand policies prefetch nothing, and the counters add up."""
    import json

    from tritonmoe.tools import bench_offload

    t, _, cfg = traces
    out = tmp_path / "bench.json"
    bench_offload.main(["--device", "cpu", "--dtype", "float32", "--small", "--shape", shape, "--traces",
                        str(t.path), "--new-tokens", "3", "--budgets", "25", "--batch", "1", "2",
                        "--groups-b1", "1", "--policies", "resident", "activation", "lru", "lfu", "lookahead",
                        "--eamc-capacity", "8", "--out", str(out)])
    results = json.load(open(out))["results"]
    got = {(r["policy"], r["batch"]) for r in results}
    assert got == {(p, b) for p in ("resident", "activation", "lru", "lfu", "lookahead") for b in (1, 2)}
    for b in (1, 2):  # the baseline is measured before and after the policies; ratios use the mean of both
        before, after = [r for r in results if r["policy"] == "resident" and r["batch"] == b]
        assert (before["measured"], after["measured"]) == ("before", "after")
        mean = (before["tpot_s"] + after["tpot_s"]) / 2
        assert before["resident_tpot_mean_s"] == pytest.approx(mean)
        assert before["resident_drift"] == pytest.approx(max(before["tpot_s"], after["tpot_s"])
                                                         / min(before["tpot_s"], after["tpot_s"]))
        lru = next(r for r in results if r["policy"] == "lru" and r["batch"] == b)
        assert lru["tpot_over_resident"] == pytest.approx(lru["tpot_s"] / mean)
    for r in results:
        assert r["tpot_s"] > 0 and r["ttft_s"] > 0 and r["decode_steps"] == 3
        assert 0.0 <= r["decode_hit_rate"] <= 1.0
        if r["policy"] == "resident":
            assert r["decode_uses_per_step"] == 0 and r["decode_demand_bytes_per_step"] == 0
            assert r["decode_hit_rate_per_layer"] == []
        else:
            # a decode step of B rows uses between top-k and B x top-k experts per layer
            assert cfg.top_k * cfg.layers <= r["decode_uses_per_step"] <= r["batch"] * cfg.top_k * cfg.layers
            # per layer: the overall rate is their (use-weighted) mean; stalls per step sum to the total
            per_layer = r["decode_hit_rate_per_layer"]
            assert len(per_layer) == len(r["decode_stall_ms_per_layer"]) == cfg.layers
            assert min(per_layer) - 1e-4 <= r["decode_hit_rate"] <= max(per_layer) + 1e-4
            assert sum(r["decode_stall_ms_per_layer"]) == pytest.approx(1e3 * r["decode_stall_s_per_step"], abs=1e-2)
        if r["policy"] in ("lru", "lfu"):
            assert r["decode_prefetch_bytes_per_step"] == 0 and r["decode_prefetch_precision"] == 0.0
            # demand-only: no cache copies fewer experts than Belady's MIN on the same replay
            assert r["min_moved_per_step"] <= r["decode_misses_per_step"] + 1e-9
            assert r["floor_s"] >= r["bound_min_transfer_s"] and r["tpot_over_floor"] > 0
        if r["policy"] == "activation":
            assert r["eamc_entries"] == min(8, (t.split == "eamc").sum()) > 0  # EAMC capacity 8


@pytest.mark.parametrize("shape", ["dsv2lite", "qwen3"])
def test_host_time_mode_drives_the_offloader_through_every_policy(traces, tmp_path, shape):
    """``--host-time``: the offloader alone, layer by layer, with the trace's routing; every policy reports host
    time per token and per layer, and counters that add up; ``--prediction`` reports precisions in [0, 1]."""
    import json

    from tritonmoe.tools import bench_offload

    t, _, cfg = traces
    out = tmp_path / "host.json"
    bench_offload.main(["--host-time", "--device", "cpu", "--shape", shape, "--traces", str(t.path),
                        "--new-tokens", "3", "--warmup-tokens", "1", "--budgets", "25", "--batch", "1", "2",
                        "--groups-b1", "1", "--eamc-capacity", "8", "--out", str(out),
                        "--plot-prefix", str(tmp_path / "replay")])
    assert (tmp_path / "replay_decisions.png").stat().st_size > 10_000  # the hit-rate bars
    assert (tmp_path / "replay_copies.png").stat().st_size > 10_000  # copies per step and prefill, MIN's ticks
    results = json.load(open(out))["results"]
    assert {(r["policy"], r["batch"]) for r in results} == {(p, b) for p in bench_offload.POLICIES for b in (1, 2)}
    for r in results:
        assert r["decode_steps"] == 3 and r["layers"] == cfg.layers and r["top_k"] == cfg.top_k
        per_layer = r["decode_hit_rate_per_layer"]
        assert len(per_layer) == cfg.layers and min(per_layer) - 1e-4 <= r["decode_hit_rate"] <= max(per_layer) + 1e-4
        assert r["host_ms_per_token"] > 0 and r["host_ms_per_layer"] == pytest.approx(r["host_ms_per_token"] / cfg.layers)
        assert r["wall_ms_per_token"] >= r["host_ms_per_token"] and 0.0 <= r["decode_hit_rate"] <= 1.0
        assert cfg.top_k <= r["decode_uses_per_step"] / cfg.layers <= r["batch"] * cfg.top_k
        if r["policy"] in ("lru", "lfu"):
            assert r["decode_prefetches_per_step"] == 0
    bench_offload.main(["--host-time", "--prediction", "--device", "cpu", "--shape", shape, "--traces", str(t.path),
                        "--new-tokens", "3", "--eamc-capacity", "8", "--out", str(out)])
    pred = json.load(open(out))["env"][f"prediction_{shape}"]
    assert set(pred) == {"precision_at_k_eamc", "precision_at_k_popularity", "precision_at_k_own_history"}
    assert all(0.0 <= v <= 1.0 for v in pred.values())


def test_timed_benchmark_under_continuous_batching(traces, tmp_path):
    """``--arrival-gap`` in the timed benchmark: the real model and KV cache under the engine's continuous batching
    (requests prefilled alone and merged into the running batch's cache); rows report the mean decode batch and one
    prefill per request, and every request generates the same tokens, picked with the same logits, as when it
    runs alone (resident, and offloaded): the merged cache's positions and masks are right (either one dropped
    fails this)."""
    import json

    import torch

    from tritonmoe.tools import bench_offload as bo

    t, _, cfg = traces
    out = tmp_path / "cont.json"
    bo.main(["--device", "cpu", "--dtype", "float32", "--small", "--shape", "dsv2lite", "--traces", str(t.path),
             "--new-tokens", "3", "--budgets", "25", "--batch", "3", "--arrival-gap", "1",
             "--policies", "resident", "auto+lookahead", "lru", "--eamc-capacity", "8", "--out", str(out)])
    results = json.load(open(out))["results"]
    assert {r["policy"] for r in results} == {"resident", "auto+lookahead", "lru"}
    for r in results:
        # three requests of 3 tokens joining at steps 0, 1, 2: decode batches 1, 2, 3, 2, 1
        assert r["arrival_gap"] == 1 and r["decode_steps"] == 5 and r["mean_decode_batch"] == pytest.approx(9 / 5)
        assert r["prefill_forwards"] == 3 and r["tpot_s"] > 0 and r["ttft_s"] > 0
        if r["policy"] == "lru":
            assert r["min_moved_per_step"] <= r["decode_misses_per_step"] + 1e-9

    bench = bo.Bench("dsv2lite", t, torch.device("cpu"), torch.float32, small=True)
    model, feed, modules = bench.build()
    groups = bo.groups_for(t, 3, 2)

    def generate(gap, off=None, lookahead=False):
        r = bo.run_continuous(model, feed, t, groups, 4, torch.device("cpu"), off, 0, lookahead, gap)
        return r["tokens"], r["logits"]

    def same(a, b):  # the tokens, and the logits they were picked with (a wrong position or mask moves those)
        assert a[0] == b[0] and a[1].keys() == b[1].keys()
        for key in a[1]:
            assert a[1][key] == pytest.approx(b[1][key], rel=1e-4, abs=1e-5), key

    bench.make_resident(modules)
    model.set_experts_implementation("grouped_mm")
    alone = generate(10)  # a request finishes before the next arrives: each decodes alone
    assert len(alone[0]) == 6 and all(len(v) == 5 for v in alone[0].values())
    same(generate(1), alone)
    same(generate(2), alone)
    store = bench.host_store(modules)
    eamc = str(tmp_path / "eamc.npy")
    bo.eamc_file(t, 4, 8, eamc)
    off, lookahead = bo.attach_policy("auto+lookahead", 25, 8, str(tmp_path / "e.npy"), eamc, bench, model, modules,
                                      store, feed, torch.device("cpu"))
    # the bench's host tier holds its own random experts, so offloaded tokens differ from resident ones; they must
    # not depend on the schedule (nor on what the cache held)
    alone_offloaded = generate(10, off, lookahead)
    assert alone_offloaded[1] != alone[1]
    same(generate(1, off, lookahead), alone_offloaded)
    off.close()


@pytest.mark.parametrize("gap", [0, 1, 2, 5])
def test_arrival_schedule_is_the_serving_engines(gap):
    """``--arrival-gap``: request j joins once j x gap decode steps have run, prefilled alone (the engine prefills
    each admitted request in a forward of its own); every request gets its decode steps 0..steps-1 in order, in
    forwards shared with whoever is running, and ends right after its last; gap 0 is the lockstep batch."""
    from tritonmoe.tools.offload_oracle import schedule

    group, steps = [4, 7, 9], 3
    events = list(schedule(group, steps, gap))
    seen = {r: [] for r in group}
    decodes, joined, ended = 0, [], []
    for kind, rows in events:
        if kind == "prefill":
            assert len(rows) == (len(group) if gap == 0 else 1)
            for r in rows:
                assert not seen[r] and r not in joined
                joined.append((r, decodes))
        elif kind == "decode":
            decodes += 1
            assert {r for r, _ in rows} <= {r for r, _ in joined} and not {r for r, _ in rows} & set(ended)
            for r, t in rows:
                seen[r].append(t)
        else:
            for r in rows:
                assert seen[r] == list(range(steps))
            ended += rows
    assert sorted(ended) == group and all(seen[r] == list(range(steps)) for r in group)
    # decode forwards run before each join (at gap 5 a request has finished before the next arrives: idle steps)
    expected = {0: [0, 0, 0], 1: [0, 1, 2], 2: [0, 2, 4], 5: [0, 3, 6]}[gap]
    assert joined == list(zip(group, expected))
    assert decodes == {0: 3, 1: 5, 2: 7, 5: 9}[gap]
    # no decode steps (a warm-up of none): every request prefills and ends
    events = list(schedule(group, 0, gap))
    assert [k for k, _ in events if k == "decode"] == [] and sorted(sum((r for k, r in events if k == "end"), [])) \
        == group


def test_host_time_with_staggered_arrivals(traces, tmp_path):
    """The continuous-batching replay reports its mean decode batch, what each prefill moved and MIN's floor on
    the same interleaving; it counts only decode steps, one per forward."""
    import json

    from tritonmoe.tools import bench_offload

    t, _, cfg = traces
    out = tmp_path / "stag.json"
    bench_offload.main(["--host-time", "--device", "cpu", "--shape", "dsv2lite", "--traces", str(t.path),
                        "--new-tokens", "4", "--budgets", "25", "--batch", "2", "--arrival-gap", "2",
                        "--policies", "auto+lookahead", "lru", "--eamc-capacity", "8", "--out", str(out)])
    results = json.load(open(out))["results"]
    assert {r["policy"] for r in results} == {"auto+lookahead", "lru"}
    for r in results:
        # two requests of 4 tokens, the second joining after 2 steps: batches 1, 1, 2, 2, 1, 1
        assert r["arrival_gap"] == 2 and r["decode_steps"] == 6 and r["mean_decode_batch"] == pytest.approx(8 / 6)
        # MIN replays the same interleaving: no policy copies fewer experts per step
        assert r["prefill_moved_per_request"] > 0 and 0 < r["min_moved_per_step"] <= r["moved_per_step"]


def test_host_time_with_a_shifting_request_mix(traces, tmp_path):
    """``--shift A,B``: the warm-up groups come from category A, the measured ones from B (and only those count);
    ``--frequency-half-life`` reaches the activation-aware policies; a bad category is a clear error."""
    import json

    from tritonmoe.tools import bench_offload

    t, _, cfg = traces
    cats, counts = np.unique(t.category, return_counts=True)
    a, b = cats[np.argsort(-counts)[:2]]
    groups = bench_offload.shifted_groups(t, 2, 3, 2, f"{a},{b}")
    assert [set(t.category[g]) for g in groups] == [{a}] * 3 + [{b}] * 2
    assert all(len(set(g)) == 2 for g in groups)
    out = tmp_path / "shift.json"
    for half_life in ("0", "4"):
        bench_offload.main(["--host-time", "--device", "cpu", "--shape", "dsv2lite", "--traces", str(t.path),
                            "--new-tokens", "3", "--budgets", "25", "--batch", "2", "--warmup", "3", "--groups-bn",
                            "2", "--shift", f"{a},{b}", "--frequency-half-life", half_life, "--policies",
                            "auto+lookahead", "lru", "--eamc-capacity", "8", "--out", str(out)])
        results = {r["policy"]: r for r in json.load(open(out))["results"]}
        assert results["auto+lookahead"]["frequency_half_life"] == float(half_life)
        assert results["lru"]["frequency_half_life"] == 64.0  # not an activation-aware policy: the default stays
        assert all(r["decode_steps"] == 2 * 3 and r["shift"] == f"{a},{b}" for r in results.values())
    with pytest.raises(ValueError, match="two of the trace's categories"):
        bench_offload.shifted_groups(t, 2, 1, 1, "python,poetry")


def test_synthetic_traces_have_the_shape_and_clusters_in_both_splits():
    from tritonmoe.tools.bench_offload import SyntheticTraces

    t = SyntheticTraces(layers=4, num_experts=16, top_k=3, requests=24, prompt_len=20, gen_len=5, clusters=8)
    assert t.experts.shape == (24, 4, 25, 3) and t.lookahead.shape == (24, 3, 5, 3)
    assert (np.diff(t.experts.astype(int), axis=-1) > 0).all() and t.experts.max() < 16
    assert (t.lookahead_prefill.sum(axis=-1) == 20 * 3).all()
    clusters = np.arange(24) % 8
    assert set(clusters[t.split == "eval"]) == set(clusters[t.split == "eamc"]) == set(range(8))
    # requests of one cluster share preferences: their decode EAMs are closer than other clusters'
    eams = np.stack([t.eam(r)[1].ravel() for r in range(24)]).astype(float)
    eams /= np.linalg.norm(eams, axis=1, keepdims=True)
    sims = eams @ eams.T
    same = clusters[:, None] == clusters[None, :]
    np.fill_diagonal(same, False)
    other = clusters[:, None] != clusters[None, :]
    assert sims[same].mean() > sims[other].mean()


def test_benchmark_rounds_alternate_the_order_and_report_the_median_round(traces, tmp_path, capsys):
    """``--rounds``: each policy runs once per round, odd rounds in reverse order (no policy always first), and
    its row is its median round with every round's time beside it."""
    import json

    from tritonmoe.tools import bench_offload

    t, _, _ = traces
    out = tmp_path / "bench.json"
    bench_offload.main(["--device", "cpu", "--dtype", "float32", "--small", "--shape", "dsv2lite", "--traces",
                        str(t.path), "--new-tokens", "2", "--budgets", "25", "--batch", "1", "--groups-b1", "1",
                        "--policies", "lru", "lookahead", "--rounds", "3", "--eamc-capacity", "8", "--out", str(out)])
    rows = json.load(open(out))["results"]
    assert [r["policy"] for r in rows] == ["lru", "lookahead"]
    for r in rows:
        assert len(r["tpot_rounds_s"]) == 3 and r["tpot_s"] == sorted(r["tpot_rounds_s"])[1]
    log = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "[round" in line]
    assert log == ["lru", "lookahead", "lookahead", "lru", "lru", "lookahead"]
    with pytest.raises(SystemExit, match="--rounds"):
        bench_offload.main(["--rounds", "0", "--shape", "dsv2lite", "--traces", str(t.path)])
