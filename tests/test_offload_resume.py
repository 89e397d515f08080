"""A migrated request's expert activation trace: the destination rebuilds it from the resumed tokens.

The tokens a destination resumes were decode steps at the source, and its prefill recomputes their routing, so
their counts go to the request's decode EAM: after the destination's prefill the request's EAMs equal the source's
at the same point, and the activation predictor's first decode step predicts what the source's did."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tritonmoe.backend.engine import Engine
from tritonmoe.backend.offload import ActivationTracer, OffloadConfig, load_offloaded_model
from tritonmoe.backend.sampling import parse_sampling
from tritonmoe.tools.tiny_models import ARCHITECTURES, TinySpec, build

N = 12  # tokens of the stream
PROMPT = [5, 17, 33, 9, 100, 41, 7, 250]
WARMUP = [[301, 12, 8, 44], [77, 78, 79, 80, 81], [5, 17, 33, 9, 100], [400, 2, 399, 3], [60, 61, 62],
          [250, 7, 41, 100, 9]]
# one best match per sequence: the prediction depends on which stored EAM the running one is closest to
CONFIG = dict(cache_budget="40%", eviction="activation", prefetch="activation", eamc_top_matches=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_tiny")
    return {arch: build(TinySpec(arch=arch, layers=3, experts=8, top_k=2), root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def eamc_files(checkpoints, tmp_path_factory):
    """Per architecture, an EAM collection from a few finished requests, so the predictor has something to
    match."""
    paths = {}
    for arch, checkpoint in checkpoints.items():
        engine = offloaded_engine(checkpoint)
        for i, prompt in enumerate(WARMUP):
            generate(engine, prompt, f"warm-{i}")
        assert len(engine.offloader.eamc) == len(WARMUP)
        paths[arch] = tmp_path_factory.mktemp("eamc") / f"{arch}.npy"
        engine.offloader.eamc.save(paths[arch])
    return paths


@pytest.fixture
def checkpoint(checkpoints):
    return checkpoints["qwen3_moe"]


@pytest.fixture
def eamc_file(eamc_files):
    return eamc_files["qwen3_moe"]


def offloaded_engine(checkpoint, eamc_path=None) -> Engine:
    model, offloader = load_offloaded_model(checkpoint, "cpu", torch.float32,
                                            OffloadConfig(**CONFIG, eamc_path=str(eamc_path) if eamc_path else None))
    return Engine(model, AutoTokenizer.from_pretrained(checkpoint), max_num_seqs=2, offloader=offloader)


def generate(engine: Engine, prompt: list[int], seq_id: str, resume_ids: list[int] = ()) -> list[int]:
    """Run one greedy request of ``N`` tokens to its end; its token ids (resumed ones included)."""
    q = queue.Queue()
    params = parse_sampling({"max_tokens": N, "ignore_eos": True}, max_model_len=engine.max_model_len)
    engine.submit(prompt, params, q.put, seq_id=seq_id, resume_ids=resume_ids)
    while engine.num_running or engine._pending:
        engine.step()
    outs = [q.get() for _ in range(q.qsize())]
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    return list(resume_ids) + [t for o in outs for t in o.token_ids]


def watch(engine: Engine, seq_id: str) -> tuple[list, list]:
    """Record, before each forward, a copy of ``seq_id``'s ``[2, L, E]`` EAM (None before its first), and per
    forward the predictor's prediction after each MoE layer."""
    off = engine.offloader
    eams, predictions = [], []
    begin, observe = off.begin_forward, off.predictor.observe

    def recording_begin(seq_ids, phase, resumed=None):
        eam = off.tracer.eam(seq_id)
        eams.append(None if eam is None else eam.copy())
        predictions.append([])
        begin(seq_ids, phase, resumed=resumed)

    def recording_observe(layer):
        observe(layer)
        predictions[-1].append(off.predictor.prediction.copy())

    off.begin_forward, off.predictor.observe = recording_begin, recording_observe
    return eams, predictions


@pytest.mark.parametrize("arch,k", [("qwen3_moe", 1), ("qwen3_moe", 5), ("qwen3_moe", N - 2)] +
                         [(arch, 5) for arch in ARCHITECTURES if arch != "qwen3_moe"])
def test_destination_rebuilds_the_trace_and_predicts_as_the_source(checkpoints, eamc_files, arch, k):
    checkpoint, eamc_file = checkpoints[arch], eamc_files[arch]
    source = offloaded_engine(checkpoint, eamc_file)
    src_eams, src_pred = watch(source, "r")
    tokens = generate(source, PROMPT, "r")
    # the source: forward 0 is the prefill (emits token 0), forward j a decode step that feeds token j-1; so
    # before forward k+1 its decode EAM holds the routing of tokens 0..k-1, and forward k+1 feeds token k
    assert len(src_eams) == N

    dest = offloaded_engine(checkpoint, eamc_file)  # a fresh offloader, the same EAM collection
    dst_eams, dst_pred = watch(dest, "r")
    resumed = generate(dest, PROMPT, "r", resume_ids=tokens[:k])
    assert resumed == tokens  # greedy, activation prefetching and eviction on: the same stream

    # destination: forward 0 is the prefill of prompt + tokens 0..k-1 (emits token k), forward 1 feeds token k
    rebuilt, at_source = dst_eams[1], src_eams[k + 1]
    assert rebuilt.dtype == np.int64 and at_source.dtype == np.int64
    np.testing.assert_array_equal(rebuilt[0], at_source[0])  # prefill EAM: the prompt's rows only
    np.testing.assert_array_equal(rebuilt[1], at_source[1])  # decode EAM: the k resumed tokens, exact counts
    assert (rebuilt[1].sum(axis=1) == k * 2).all()  # k tokens x top-2 on every layer

    # the first decode step at the destination predicts what the source's step feeding token k predicted, layer
    # by layer; it matched the collection from the rebuilt decode EAM, not an empty one
    assert len(dst_pred[1]) == len(src_pred[k + 1]) == source.offloader.store.num_layers
    for dst, src in zip(dst_pred[1], src_pred[k + 1]):
        np.testing.assert_array_equal(dst, src)
    assert any(p.any() for p in dst_pred[1])


def test_without_resumed_rows_the_first_decode_prediction_differs(checkpoint, eamc_file):
    """What the rebuild changes: the same resume with the resumed rows traced as prefill (the behaviour before)
    starts decode from an empty EAM and predicts otherwise than the source did."""
    k = N - 2
    source = offloaded_engine(checkpoint, eamc_file)
    _, src_pred = watch(source, "r")
    tokens = generate(source, PROMPT, "r")
    dest = offloaded_engine(checkpoint, eamc_file)
    begin = dest.offloader.begin_forward
    dest.offloader.begin_forward = lambda seq_ids, phase, resumed=None: begin(seq_ids, phase)  # ignore resumed
    dst_eams, dst_pred = watch(dest, "r")
    assert generate(dest, PROMPT, "r", resume_ids=tokens[:k]) == tokens
    assert not dst_eams[1][1].any()
    assert any(not np.array_equal(d, s) for d, s in zip(dst_pred[1], src_pred[k + 1]))


def test_batched_prefill_splits_each_sequence_s_last_rows(checkpoint):
    """Per sequence of a (left-padded) batched prefill: its last ``resumed`` rows count as decode, the rest as
    prefill; the totals are the unsplit counts."""
    ids = torch.tensor([[3, 3, 5, 17, 33, 9], [301, 12, 8, 44, 45, 46]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    model, off = load_offloaded_model(checkpoint, "cpu", torch.float32, OffloadConfig(**CONFIG))
    with torch.no_grad():
        off.begin_forward(["a", "b"], "prefill")
        model(ids, attention_mask=mask)
        off.begin_forward(["a2", "b2"], "prefill", resumed=[2, 0])
        model(ids, attention_mask=mask)
        off.begin_forward(["a3"], "prefill", resumed=[6])
        model(ids[:1], attention_mask=mask[:1])
    a, b, a2, b2, a3 = (off.tracer.eam(s) for s in ("a", "b", "a2", "b2", "a3"))
    np.testing.assert_array_equal(a2[0] + a2[1], a[0])
    assert (a2[1].sum(axis=1) == 2 * 2).all() and (a2[0].sum(axis=1) == 4 * 2).all()
    np.testing.assert_array_equal(b2, b)  # nothing resumed: all prefill
    assert not a3[0].any() and (a3[1].sum(axis=1) == 6 * 2).all()
    with pytest.raises(ValueError, match="resumed"):
        off.begin_forward(["a"], "decode", resumed=[1])
    with pytest.raises(ValueError, match="resumed"):
        off.begin_forward(["a", "b"], "prefill", resumed=[1])
    off.begin_forward(["a"], "prefill", resumed=[7])
    with pytest.raises(ValueError, match="do not fit"):
        model(ids[:1])


def test_tracer_moves_resumed_counts_to_decode():
    t = ActivationTracer(2, 4)
    t.begin_forward(["a", "b"], "prefill", resumed=True)
    t.record(0, np.array([[3, 1, 0, 0], [0, 2, 2, 0]]), np.array([[1, 1, 0, 0], [0, 0, 0, 0]]))
    a, b = t.eam("a"), t.eam("b")
    assert a[0, 0].tolist() == [2, 0, 0, 0] and a[1, 0].tolist() == [1, 1, 0, 0]
    assert b[0, 0].tolist() == [0, 2, 2, 0] and not b[1].any()
    with pytest.raises(ValueError, match="prefill"):
        t.begin_forward(["a"], "decode", resumed=True)
