"""The checkpoint format's pure parts: expert detection, storage order, layout planning, index validation."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonmoe.loader.format import (ALIGNMENT, CheckpointError, CheckpointIndex, ExpertEntry, TensorEntry,
                                     align_up)
from tritonmoe.loader.layout import ExpertKey, expert_of, group_units, plan_layout


@pytest.mark.parametrize("name, key", [
    ("model.layers.1.block_sparse_moe.experts.3.w1.weight", ExpertKey("model.layers.1.block_sparse_moe.experts", 1, 3)),
    ("model.layers.12.mlp.experts.63.down_proj.weight", ExpertKey("model.layers.12.mlp.experts", 12, 63)),
    ("model.layers.3.mlp.experts.0.gate_proj.weight_scale_inv", ExpertKey("model.layers.3.mlp.experts", 3, 0)),
    ("encoder.block.5.layer.1.mlp.experts.expert_7.wi.weight",
     ExpertKey("encoder.block.5.layer.1.mlp.experts", 5, 7)),
    ("model.layers.1.mlp.shared_experts.gate_proj.weight", None),
    ("model.layers.1.mlp.shared_expert.up_proj.weight", None),
    ("model.layers.1.mlp.gate.weight", None),
    ("model.layers.1.mlp.experts.gate_up_proj", None),  # already fused 3-D: not one expert's tensor
    ("model.embed_tokens.weight", None),
])
def test_expert_of_recognises_routed_experts_only(name, key):
    assert expert_of(name) == key


def test_group_units_puts_non_experts_first_then_experts_in_layer_order():
    names = ["model.layers.10.mlp.experts.0.w.weight", "model.layers.2.mlp.experts.1.b.weight",
             "model.layers.2.mlp.experts.1.a.weight", "model.norm.weight", "model.layers.2.mlp.experts.0.a.weight",
             "model.embed_tokens.weight", "model.layers.10.attn.weight", "model.layers.2.attn.weight"]
    units, experts = group_units(names)
    assert units == [["model.embed_tokens.weight"], ["model.layers.2.attn.weight"], ["model.layers.10.attn.weight"],
                     ["model.norm.weight"], ["model.layers.2.mlp.experts.0.a.weight"],
                     ["model.layers.2.mlp.experts.1.a.weight", "model.layers.2.mlp.experts.1.b.weight"],
                     ["model.layers.10.mlp.experts.0.w.weight"]]
    assert [(k.layer, k.expert) for k in experts] == [(2, 0), (2, 1), (10, 0)]


sizes = st.integers(min_value=0, max_value=3 * ALIGNMENT + 17)
unit_lists = st.lists(st.lists(sizes, min_size=1, max_size=4), min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(unit_sizes=unit_lists, partition_bytes=st.sampled_from([ALIGNMENT, 3 * ALIGNMENT, 10 * ALIGNMENT, 1 << 30]))
def test_layout_is_aligned_ordered_disjoint_and_keeps_units_together(unit_sizes, partition_bytes):
    units = [[(f"u{i}.t{j}", n) for j, n in enumerate(unit)] for i, unit in enumerate(unit_sizes)]
    placements, partition_sizes = plan_layout(units, partition_bytes)
    order = [(name, n) for unit in units for name, n in unit]
    assert set(placements) == {name for name, _ in order}
    for size in partition_sizes:
        assert size % ALIGNMENT == 0
    previous_end = {}
    for name, n in order:
        place = placements[name]
        assert place.offset % ALIGNMENT == 0
        assert place.offset + n <= partition_sizes[place.partition]
        # storage order is the given order, so disjointness is "each tensor starts after the previous one ends"
        assert place.offset >= previous_end.get(place.partition, 0)
        previous_end[place.partition] = place.offset + n
    for unit in units:
        first = placements[unit[0][0]]
        for (name_a, n_a), (name_b, _) in zip(unit, unit[1:]):
            a, b = placements[name_a], placements[name_b]
            assert b.partition == first.partition
            assert b.offset == a.offset + align_up(n_a)  # contiguous up to alignment padding
    for partition, size in enumerate(partition_sizes):
        held = [unit for unit in units if placements[unit[0][0]].partition == partition]
        assert held, "no empty partitions"
        holding_bytes = [unit for unit in held if any(n for _, n in unit)]
        assert size <= partition_bytes or len(holding_bytes) == 1  # only a unit too large on its own overflows


def _entry(offset, nbytes=ALIGNMENT, partition=0, shape=None):
    shape = shape if shape is not None else [nbytes // 4]
    return TensorEntry(partition, offset, nbytes, shape, [1] * len(shape) if len(shape) == 1 else [shape[1], 1],
                       "float32", "0")


def _index(tensors, partitions=(4 * ALIGNMENT,), experts=()):
    return CheckpointIndex(tensors=tensors, experts=list(experts), partitions=list(partitions), fingerprint="f")


def test_index_json_round_trips():
    index = _index({"a": _entry(0), "b": _entry(ALIGNMENT)},
                   experts=[ExpertEntry("m.experts", 0, 0, 0, 0, 2 * ALIGNMENT, ["a", "b"])])
    again = CheckpointIndex.from_json(index.to_json())
    assert again == index
    assert again.expert(0, 0).tensors == ["a", "b"]


@pytest.mark.parametrize("tensors, partitions, message", [
    ({"a": _entry(0, 2 * ALIGNMENT), "b": _entry(ALIGNMENT)}, (4 * ALIGNMENT,), "overlap"),
    ({"a": _entry(100)}, (4 * ALIGNMENT,), "unaligned"),
    ({"a": _entry(3 * ALIGNMENT, 2 * ALIGNMENT)}, (4 * ALIGNMENT,), "outside"),
    ({"a": _entry(0, partition=1)}, (4 * ALIGNMENT,), "does not exist"),
    ({"a": dataclasses.replace(_entry(0), bytes=12)}, (4 * ALIGNMENT,), "needs"),
    ({"a": dataclasses.replace(_entry(0), dtype="float128")}, (4 * ALIGNMENT,), "unsupported dtype"),
    ({"a": _entry(0)}, (ALIGNMENT + 1,), "multiple"),
])
def test_inconsistent_index_is_rejected_naming_the_problem(tensors, partitions, message):
    with pytest.raises(CheckpointError, match=message):
        CheckpointIndex.from_json(_index(tensors, partitions).to_json())


def test_expert_range_must_cover_exactly_its_tensors():
    index = _index({"a": _entry(0), "b": _entry(2 * ALIGNMENT)},
                   experts=[ExpertEntry("m.experts", 0, 0, 0, 0, ALIGNMENT, ["a", "b"])])
    with pytest.raises(CheckpointError, match="expert 0 of m.experts"):
        CheckpointIndex.from_json(index.to_json())


def test_other_format_versions_are_refused():
    text = _index({"a": _entry(0)}).to_json().replace('"format_version":1', '"format_version":99')
    with pytest.raises(CheckpointError, match="format version 99"):
        CheckpointIndex.from_json(text)
