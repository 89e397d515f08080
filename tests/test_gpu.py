"""The engine on a CUDA GPU (run on the GPU machine: pytest -m gpu). Same contract as on the CPU: continuous
batching gives each request exactly what transformers' generate() gives it alone, on the same device and dtype."""

import queue

import pytest
import torch

from conftest import PROMPTS
from tritonmoe.backend.checkpoint import load_model, load_tokenizer
from tritonmoe.backend.engine import Engine
from tritonmoe.backend.sampling import parse_sampling

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (-m gpu on the GPU machine)")]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("dtype, kernel", [("float32", None), ("bfloat16", None), ("bfloat16", "grouped_mm")])
def test_engine_on_cuda_matches_generate(tiny, arch, dtype, kernel):
    """``kernel``: transformers' experts implementation (grouped_mm is what experts_implementation=auto picks for
    bf16 on Hopper)."""
    path = tiny(arch)
    device = torch.device("cuda", 0)
    model, tok = load_model(path, device, dtype, experts_implementation=kernel), load_tokenizer(path)
    refs = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        refs.append(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist())
    engine = Engine(model, tok, max_num_seqs=4)
    streams = []
    for prompt in PROMPTS:
        q = queue.Queue()
        engine.submit(tok.encode(prompt), parse_sampling({"max_tokens": 12}, max_model_len=512), q.put)
        streams.append(q)
        engine.step()
    while engine.num_running:
        engine.step()
    for ref, q in zip(refs, streams):
        outs = []
        while not q.empty():
            outs.append(q.get())
        expected = tok.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(o.text for o in outs) == expected
        assert outs[-1].output_tokens == len(ref)
