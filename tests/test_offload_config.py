"""Offloading parameters: parsing from Triton's string map, budgets, and errors that name the key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tritonmoe.backend.offload import PARAMETER_KEYS, ExpertBudget, OffloadConfig


def test_defaults_and_full_parse():
    assert OffloadConfig.from_parameters({}) == OffloadConfig()
    cfg = OffloadConfig.from_parameters({
        "expert_cache_budget": "64MiB", "expert_eviction": "LFU", "expert_prefetch": "lookahead",
        "eamc_capacity": "200", "eamc_path": "/tmp/x.npy", "eamc_top_matches": "2",
        "expert_pin_host_memory": "false",
        "max_batch_size": "8",  # another component's key: not ours, ignored
    })
    assert cfg == OffloadConfig(cache_budget="64MiB", eviction="lfu", prefetch="lookahead", eamc_capacity=200,
                                eamc_path="/tmp/x.npy", eamc_top_matches=2, pin_host_memory=False)
    assert cfg.budget == ExpertBudget(nbytes=64 * 2**20)
    assert not cfg.uses_activation_prediction
    assert OffloadConfig.from_parameters({"eamc_path": ""}).eamc_path is None


@pytest.mark.parametrize("key,value,reason", [
    ("expert_cache_budget", "lots", "bad budget"),
    ("expert_cache_budget", "0%", "percentage"),
    ("expert_cache_budget", "1.5", "bad budget"),
    ("expert_eviction", "fifo", "eviction must be one of"),
    ("expert_prefetch", "always", "prefetch must be one of"),
    ("eamc_capacity", "many", "integer"),
    ("eamc_capacity", "0", "at least 1"),
    ("eamc_top_matches", "-1", "at least 1"),
    ("expert_pin_host_memory", "yes", '"true" or "false"'),
    ("expert_eviction_depth_factor", "1", '"true" or "false"'),
    ("expert_eviction_frequency_weight", "lots", "expected a number"),
    ("expert_eviction_frequency_weight", "-1", "finite number >= 0"),
    ("expert_eviction_frequency_weight", "nan", "finite number >= 0"),
    ("expert_eviction_frequency_half_life", "soon", "expected a number"),
    ("expert_eviction_frequency_half_life", "-1", "finite number >= 0"),
    ("expert_eviction_frequency_half_life", "inf", "finite number >= 0"),
    ("expert_cache_bugdet", "25%", "unknown offloading parameter"),
    ("expert_trace_path", "/no/such/folder/trace.jsonl", "does not exist"),
    ("expert_trace_path", "/tmp", "is a directory"),
])
def test_bad_values_name_the_key(key, value, reason):
    with pytest.raises(ValueError, match=reason) as info:
        OffloadConfig.from_parameters({key: value})
    assert repr(key) in str(info.value)


def test_the_depth_factor_is_off_by_default_and_only_for_activation_eviction():
    from tritonmoe.backend.offload.eviction import ActivationAwareEviction, make_eviction_policy

    assert not OffloadConfig().eviction_depth_factor
    on = OffloadConfig.from_parameters({"expert_eviction_depth_factor": "TRUE"})
    assert on.eviction_depth_factor and on.eviction == "auto"
    with pytest.raises(ValueError, match="applies to expert_eviction 'activation' and 'auto' only, not 'lru'"):
        OffloadConfig.from_parameters({"expert_eviction": "lru", "expert_eviction_depth_factor": "true"})
    assert OffloadConfig().eviction_frequency_weight == 2.0
    assert OffloadConfig.from_parameters({"expert_eviction_frequency_weight": "0.5"}).eviction_frequency_weight == 0.5
    with pytest.raises(ValueError, match="expert_eviction_frequency_weight applies to expert_eviction 'activation'"):
        OffloadConfig.from_parameters({"expert_eviction": "lfu", "expert_eviction_frequency_weight": "1"})
    assert OffloadConfig().eviction_frequency_half_life == 64.0
    assert OffloadConfig.from_parameters({"expert_eviction_frequency_half_life": "0"}).eviction_frequency_half_life == 0
    with pytest.raises(ValueError, match="expert_eviction_frequency_half_life applies to expert_eviction 'activation'"):
        OffloadConfig.from_parameters({"expert_eviction": "lru", "expert_eviction_frequency_half_life": "16"})
    predictor = object()
    for factor in (False, True):
        policy = make_eviction_policy("activation", predictor, factor)
        assert isinstance(policy, ActivationAwareEviction) and policy.depth_weighted == factor
        assert make_eviction_policy("auto", predictor, factor).activation.depth_weighted == factor


def test_every_field_has_a_documented_key():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "offloading.md").read_text()
    for key in PARAMETER_KEYS.values():
        assert f"`{key}`" in doc


@pytest.mark.parametrize("text,expected", [
    ("25%", ExpertBudget(fraction=0.25)), ("100%", ExpertBudget(fraction=1.0)),
    ("4096", ExpertBudget(nbytes=4096)), ("2KiB", ExpertBudget(nbytes=2048)), ("1.5 GB", ExpertBudget(nbytes=1.5e9)),
    (12345, ExpertBudget(nbytes=12345)),
])
def test_budget_parsing(text, expected):
    assert ExpertBudget.parse(text) == expected


def test_budget_to_slots():
    slot = 4096
    assert ExpertBudget.parse("25%").slots(slot, total_experts=64) == 16
    assert ExpertBudget.parse(f"{3 * slot + 100}").slots(slot, total_experts=64) == 3  # whole slots only
    assert ExpertBudget.parse("1GiB").slots(slot, total_experts=64) == 64  # never more slots than experts
    with pytest.raises(ValueError, match="holds no expert"):
        ExpertBudget.parse(f"{slot - 1}").slots(slot, total_experts=64)
    with pytest.raises(ValueError, match="holds no expert"):
        ExpertBudget.parse("1%").slots(slot, total_experts=64)


@given(layers=st.integers(1, 64), experts=st.integers(1, 256), slot_kib=st.integers(1, 1 << 14))
def test_one_expert_per_layer_is_a_valid_budget(layers, experts, slot_kib):
    """A budget of exactly one expert per MoE layer, as bytes or as a fraction, gives one slot per layer."""
    slot = slot_kib * 1024
    total = layers * experts
    assert ExpertBudget(nbytes=layers * slot).slots(slot, total) == layers
    assert ExpertBudget(fraction=1 / experts).slots(slot, total) == layers
    assert ExpertBudget.parse(f"{100 / experts}%").slots(slot, total) == layers
