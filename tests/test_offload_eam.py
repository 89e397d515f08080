"""EAM tracing, the EAM collection and activation prediction, as the MoE-Infinity paper defines them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tritonmoe.backend.offload import ActivationPredictor, ActivationTracer, EAMCollection
from tritonmoe.backend.offload.eam import cosine

L, E = 4, 5


def eam(prefill=None, decode=None) -> np.ndarray:
    out = np.zeros((2, L, E))
    if prefill is not None:
        out[0] = prefill
    if decode is not None:
        out[1] = decode
    return out


def one_hot_rows(experts: list[int], count: float = 1.0) -> np.ndarray:
    m = np.zeros((L, E))
    m[np.arange(L), experts] = count
    return m


def test_tracer_keeps_requests_and_phases_apart():
    t = ActivationTracer(L, E)
    t.begin_forward(["a", "b"], "prefill")
    t.record(0, np.array([[1, 2, 0, 0, 0], [0, 0, 0, 3, 0]]))
    t.begin_forward(["b"], "decode")
    t.record(0, np.array([[0, 1, 0, 0, 0]]))
    a, b = t.eam("a"), t.eam("b")
    assert a[0, 0].tolist() == [1, 2, 0, 0, 0] and not a[1].any()
    assert b[0, 0].tolist() == [0, 0, 0, 3, 0] and b[1, 0].tolist() == [0, 1, 0, 0, 0]
    assert t.finish("a") is a and t.eam("a") is None
    with pytest.raises(ValueError, match="phase"):
        t.begin_forward(["a"], "train")


def test_collection_capacity_and_most_similar_replacement():
    c = EAMCollection(capacity=3, num_layers=L, num_experts=E)
    c.add(eam(one_hot_rows([0, 0, 0, 0])))
    c.add(eam(one_hot_rows([1, 1, 1, 1])))
    c.add(eam(one_hot_rows([2, 2, 2, 2])))
    assert len(c) == 3
    newcomer = eam(one_hot_rows([1, 1, 1, 3]))  # closest to the all-ones entry (3 of 4 rows shared)
    c.add(newcomer)
    assert len(c) == 3
    assert any((e == newcomer).all() for e in c.eams)
    assert not any((e == eam(one_hot_rows([1, 1, 1, 1]))).all() for e in c.eams)
    assert any((e == eam(one_hot_rows([0, 0, 0, 0]))).all() for e in c.eams)


def test_collection_skips_empty_and_checks_shape():
    c = EAMCollection(capacity=2, num_layers=L, num_experts=E)
    c.add(np.zeros((2, L, E)))
    assert len(c) == 0
    with pytest.raises(ValueError, match="does not fit"):
        c.add(np.ones((2, L + 1, E)))


def test_collection_save_load_round_trip(tmp_path):
    c = EAMCollection(capacity=4, num_layers=L, num_experts=E)
    rng = np.random.default_rng(0)
    for _ in range(3):
        c.add(rng.integers(0, 9, (2, L, E)))
    path = tmp_path / "sub" / "eamc.npy"
    c.save(path)
    back = EAMCollection.load(path, capacity=4, num_layers=L, num_experts=E)
    assert (back.eams == c.eams).all() and back.eams.dtype == np.float32
    smaller = EAMCollection.load(path, capacity=2, num_layers=L, num_experts=E)  # replacement rule applies
    assert len(smaller) == 2
    with pytest.raises(ValueError, match="do not fit"):
        EAMCollection.load(path, capacity=4, num_layers=L + 1, num_experts=E)


def test_missing_or_empty_collection_predicts_zero_without_nan(tmp_path):
    missing = EAMCollection.load(tmp_path / "nope.npy", capacity=4, num_layers=L, num_experts=E)
    assert len(missing) == 0
    missing.save(tmp_path / "empty.npy")
    empty = EAMCollection.load(tmp_path / "empty.npy", capacity=4, num_layers=L, num_experts=E)
    p = ActivationPredictor(empty, top_matches=3)
    running = np.zeros((L, E), dtype=np.int64)
    p.begin_forward([running], "decode")
    running[0, 2] = 1
    for layer in range(L):
        p.observe(layer)
        assert np.isfinite(p.prediction).all() and not p.prediction.any()
        assert p.prefetch_order(layer) == []


def test_prediction_follows_the_best_match_and_weights_by_proximity():
    c = EAMCollection(capacity=8, num_layers=L, num_experts=E)
    c.add(eam(decode=one_hot_rows([0, 1, 2, 3], 4)))
    c.add(eam(decode=one_hot_rows([4, 4, 4, 4], 4)))
    p = ActivationPredictor(c, top_matches=1)
    running = np.zeros((L, E), dtype=np.int64)
    p.begin_forward([running], "decode")
    running[0, 0] = 1  # layer 0 routed to expert 0: matches the first stored request only
    p.observe(0)
    assert p.prediction.tolist() == one_hot_rows([0, 1, 2, 3]).tolist()  # rows normalised to probabilities
    # all coming layers, nearest first: weights 1 - 1/4, 1 - 2/4, 1 - 3/4
    assert p.prefetch_order(0) == [(1, 1), (2, 2), (3, 3)]
    assert p.prefetch_order(L - 1) == []


def test_prediction_aggregates_the_best_matches_per_sequence():
    c = EAMCollection(capacity=8, num_layers=L, num_experts=E)
    c.add(eam(prefill=one_hot_rows([0, 0, 0, 0], 2)))
    c.add(eam(prefill=one_hot_rows([0, 1, 1, 1], 2)))
    c.add(eam(prefill=one_hot_rows([3, 3, 3, 3], 2)))
    p = ActivationPredictor(c, top_matches=2)
    a, b = np.zeros((L, E), dtype=np.int64), np.zeros((L, E), dtype=np.int64)
    p.begin_forward([a, b], "prefill")
    a[0, 0] = 3  # matches the first two entries equally
    b[0, 3] = 1  # matches only the third
    p.observe(0)
    # sequence a: (one_hot[0,0,0,0] + one_hot[0,1,1,1]) row-normalised; sequence b: one_hot[3,3,3,3]
    want = (one_hot_rows([0, 0, 0, 0]) + one_hot_rows([0, 1, 1, 1])) / 2 + one_hot_rows([3, 3, 3, 3])
    want[0] = [1, 0, 0, 1, 0]
    assert np.allclose(p.prediction, want)
    assert not (p.prediction[1:, 2]).any()  # an expert no match used is never predicted


@settings(max_examples=40, deadline=None)
@given(stored=arrays(np.int64, (3, 2, L, E), elements=st.integers(0, 5)),
       running=arrays(np.int64, (2, L, E), elements=st.integers(0, 5)))
def test_incremental_similarity_equals_direct_cosine(stored, running):
    """The predictor's running dot products give the same best match as cosine over rows 0..l computed afresh."""
    c = EAMCollection(capacity=3, num_layers=L, num_experts=E)
    for s in stored:
        c.add(s)
    p = ActivationPredictor(c, top_matches=1)
    live = [np.zeros((L, E), dtype=np.int64) for _ in running]
    p.begin_forward(live, "decode")
    for layer in range(L):
        for seq, r in zip(live, running):
            seq[layer] = r[layer]
        p.observe(layer)
        assert np.isfinite(p.prediction).all()
        want, tie = np.zeros((L, E)), False
        for r in running:
            flat = c.eams[:, 1, :layer + 1].reshape(len(c), (layer + 1) * E).astype(np.float64)
            sims = cosine(flat, r[:layer + 1].reshape(-1).astype(np.float64))
            if not len(sims) or sims.max() <= 0:
                continue  # nothing similar: this sequence adds nothing
            best = np.flatnonzero(np.isclose(sims, sims.max()))
            tie = tie or len(best) > 1  # equal similarities: either pick is right
            match = c.eams[best[0], 1].astype(np.float64)
            sums = match.sum(axis=1, keepdims=True)
            want += np.divide(match, sums, out=np.zeros_like(match), where=sums > 0)
        if not tie:
            assert np.allclose(p.prediction, want)
        rows = p.prediction.sum(axis=1)
        assert ((rows < 1e-9) | (rows <= len(running) + 1e-9)).all()


def test_prefetch_order_skips_resident_experts_and_keeps_the_head():
    c = EAMCollection(capacity=8, num_layers=L, num_experts=E)
    stored = np.zeros((L, E))
    stored[1] = [4, 3, 2, 1, 0]
    stored[2] = [0, 0, 0, 0, 4]
    stored[0, 0] = 1
    c.add(eam(decode=stored))
    p = ActivationPredictor(c, top_matches=1)
    running = np.zeros((L, E), dtype=np.int64)
    p.begin_forward([running], "decode")
    running[0, 0] = 1
    p.observe(0)
    full = p.prefetch_order(0)
    # layer 1's probabilities 0.4, 0.3, 0.2, 0.1 weighted 3/4; layer 2's single expert 1.0 weighted 2/4
    assert full == [(2, 4), (1, 0), (1, 1), (1, 2), (1, 3)]
    resident = np.zeros((L, E), dtype=bool)
    resident[2, 4] = resident[1, 1] = True
    assert p.prefetch_order(0, exclude=resident) == [(1, 0), (1, 2), (1, 3)]
    assert p.prefetch_order(0, exclude=resident, limit=2) == [(1, 0), (1, 2)]
    assert p.prefetch_order(0, limit=10) == full


def test_lookahead_refined_prediction_replaces_only_the_next_layer_row():
    from tritonmoe.backend.offload.eviction import ActivationAwareEviction
    from tritonmoe.backend.offload.prefetch import LookaheadRefinedPrediction

    c = EAMCollection(4, L, E)
    c.add(eam(decode=one_hot_rows([0, 1, 2, 3], 3)))
    p = ActivationPredictor(c, top_matches=1)
    running = np.zeros((L, E), dtype=np.int64)
    p.begin_forward([running], "decode")
    running[0, 0] = 1
    p.observe(0)
    base = p.prediction.copy()
    refined = LookaheadRefinedPrediction(p)
    eviction = ActivationAwareEviction(refined)
    assert refined.prediction is p.prediction  # nothing refined yet: the predictor's own array
    before = eviction.table().copy()

    refined.refine(1, np.array([0, 0, 3, 1, 0]))  # the lookahead's counts per expert of layer 1
    got = refined.prediction
    assert np.allclose(got[1], [0, 0, .75, .25, 0])
    assert np.array_equal(np.delete(got, 1, axis=0), np.delete(base, 1, axis=0))
    assert np.array_equal(p.prediction, base)  # the predictor's array is not written
    after = eviction.table()  # eviction sees the refinement: layer 1's picked experts outrank its predicted one
    assert after[1, 2] > after[1, 1] and before[1, 1] > before[1, 2]
    assert np.array_equal(np.delete(after, 1, axis=0), np.delete(before, 1, axis=0))

    refined.refine(2, np.array([0, 0, 0, 0, 2]))  # the next layer's picks replace the last ones
    assert np.array_equal(refined.prediction[1], base[1]) and np.allclose(refined.prediction[2], [0, 0, 0, 0, 1])
    refined.begin_forward()  # a new forward starts from the predictor's prediction again
    assert np.array_equal(refined.prediction, base)
    assert np.array_equal(eviction.table(), before)
