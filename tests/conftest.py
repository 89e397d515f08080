"""Shared fixtures: tiny checkpoints built locally, transformers references, and real tritonserver processes."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from tritonmoe.tools import tiny_models
from tritonmoe.tools.tritonserver import TritonServer

REPO_ROOT = Path(__file__).resolve().parent.parent
ARCHS = tiny_models.ARCHITECTURES
PROMPTS = ["def hello(world):\n    return", "import os\nimport", "The quick brown fox", "class A(object):"]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny(models_dir):
    """tiny(arch) -> path of a 2-layer random checkpoint of that architecture (built once per session)."""

    @functools.cache
    def build(arch: str) -> Path:
        return tiny_models.build(tiny_models.TinySpec(arch=arch, layers=2), models_dir / arch)

    return build


@functools.cache
def _hf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def reference():
    """reference(checkpoint, prompt, n) -> (token ids, text) of transformers' greedy generate()."""

    @functools.cache
    def ref(path: Path, prompt: str, max_new_tokens: int):
        model, tok = _hf(path)
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        return out, tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return ref


def write_model(repo: Path, name: str, checkpoint: Path, **parameters) -> Path:
    """A model folder like model_repository/tiny_moe, pointing at ``checkpoint``."""
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "model_repository" / "tiny_moe" / "1" / "model.py", d / "1" / "model.py")
    params = {"checkpoint": str(checkpoint), "max_num_seqs": "4", **parameters}
    lines = ['backend: "python"', "instance_group [{ count: 1, kind: KIND_CPU }]"]
    lines += [f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(str(v))} }} }}"
              for k, v in params.items()]
    (d / "config.pbtxt").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="session")
def triton(tmp_path_factory, tiny):
    """One real tritonserver for the end-to-end tests, with a model per architecture loaded (``moe_<arch>``)."""
    repo = tmp_path_factory.mktemp("repo")
    for arch in ARCHS:
        write_model(repo, f"moe_{arch}", tiny(arch))
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    server = TritonServer(repo, models=[f"moe_{a}" for a in ARCHS], log_path=log)
    server.start(timeout=300)
    server.repo = repo
    yield server
    server.stop()
