"""The CUDA path: cuda-python copy streams and events, pinned host tier, bf16. Run on a GPU machine:
``pytest -m gpu tests/test_offload_cuda.py``; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from tritonmoe.backend.offload import OffloadConfig, load_offloaded_model
from tritonmoe.backend.offload.timing import measure_fetch_overhead
from tritonmoe.tools.tiny_models import TinySpec, build

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
hf_logging.disable_progress_bar()

PROMPTS = [[5, 17, 33, 9, 100, 41, 7, 250], [301, 12, 8]]


def greedy(model, ids, mask, offloader=None, seq_ids=None):
    hook = None
    if offloader is not None:
        def announce(module, args, kwargs):
            rows = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
            offloader.begin_forward(seq_ids, "prefill" if rows.shape[1] > 1 else "decode")
        hook = model.register_forward_pre_hook(announce, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    finally:
        if hook is not None:
            hook.remove()
            for s in seq_ids:
                offloader.end_sequence(s)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("budget,eviction,prefetch", [("12.5%", "activation", "activation"),
                                                      ("40%", "lru", "lookahead"), ("100%", "lfu", "none")])
def test_cuda_generation_matches_stock(tmp_path, arch, budget, eviction, prefetch):
    path = build(TinySpec(arch=arch, layers=4, experts=8, top_k=2, dtype="bfloat16"), tmp_path / arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    cfg = OffloadConfig(cache_budget=budget, eviction=eviction, prefetch=prefetch)
    model, offloader = load_offloaded_model(path, "cuda", torch.bfloat16, cfg)
    assert offloader.store.pinned
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in PROMPTS], device="cuda")
    mask = (ids != 3).long()
    for rnd in range(2):  # the second round finds the first in the EAMC
        for i in range(len(PROMPTS)):
            want = greedy(ref, ids[i:i + 1], mask[i:i + 1])
            got = greedy(model, ids[i:i + 1], mask[i:i + 1], offloader, [f"{rnd}-{i}"])
            assert torch.equal(got, want)
        assert torch.equal(greedy(model, ids, mask, offloader, [f"{rnd}-a", f"{rnd}-b"]), greedy(ref, ids, mask))
    s = offloader.stats()
    offloader.close()
    print(arch, budget, eviction, prefetch, {k: v for k, v in s.items() if k != "per_layer"})
    assert s["hits"] + s["misses"] == s["uses"] > 0
    assert s["stall_s"] >= 0.0
    if prefetch == "none":
        assert s["prefetches"] == 0


@pytest.mark.parametrize("mib", [1, 17])
def test_cuda_fetch_overhead(mib):
    out = measure_fetch_overhead("cuda", expert_bytes=mib * 2**20, fetches=300)
    print(out)
    assert 0 < out["overhead_us"] < 1e5
