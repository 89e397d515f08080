"""Model parameters from config.pbtxt: parsed once, validated with messages that name the key."""

import pytest

from tritonmoe.backend.config import ConfigError, EngineConfig


def test_defaults_and_offloading_off_by_default(tmp_path):
    cfg = EngineConfig.from_parameters({"checkpoint": str(tmp_path)})
    assert cfg.checkpoint == tmp_path and cfg.max_num_seqs == 8 and cfg.offload is None
    assert cfg.experts_implementation == "auto"
    assert EngineConfig.from_parameters({"checkpoint": str(tmp_path), "experts_implementation": "grouped_mm"}
                                        ).experts_implementation == "grouped_mm"


def test_expert_cache_budget_turns_offloading_on(tmp_path):
    cfg = EngineConfig.from_parameters({"checkpoint": str(tmp_path), "expert_cache_budget": "25%",
                                        "expert_eviction": "lru", "expert_prefetch": "none"})
    assert cfg.offload.cache_budget == "25%"
    assert (cfg.offload.eviction, cfg.offload.prefetch) == ("lru", "none")
    assert cfg.offload.host_tier == "auto"
    assert EngineConfig.from_parameters({"checkpoint": str(tmp_path), "expert_cache_budget": "25%",
                                         "expert_host_tier": "Shared"}).offload.host_tier == "shared"


@pytest.mark.parametrize("params, fragment", [
    ({"expert_eviction": "lru"}, "need 'expert_cache_budget'"),
    ({"expert_cache_budget": "0%"}, "expert_cache_budget"),
    ({"expert_cache_budget": "lots"}, "expert_cache_budget"),
    ({"expert_cache_budget": "1GiB", "expert_eviction": "fifo"}, "expert_eviction"),
    ({"expert_cache_budget": "1GiB", "expert_pin_host_memory": "yes"}, "expert_pin_host_memory"),
    ({"expert_cache_budget": "1GiB", "expert_host_tier": "ssd"}, "expert_host_tier"),
    ({"expert_cache_budgt": "1GiB"}, "unknown parameter"),
    ({"max_num_seqs": "0"}, "max_num_seqs"),
    ({"report_metrics": "1"}, "true or false"),
    ({"dtype": "int8"}, "dtype"),
    ({"experts_implementation": "fast"}, "experts_implementation"),
])
def test_bad_parameters_name_the_key(tmp_path, params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        EngineConfig.from_parameters({"checkpoint": str(tmp_path), **params})
