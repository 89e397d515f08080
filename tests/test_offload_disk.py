"""The disk tier (`expert_host_tier: disk`): experts served from a converted checkpoint's files through a memory map,
for models whose experts do not fit in host memory.

Checked: greedy tokens equal transformers' `generate()` at one cache slot per layer (three architectures; on the
GPU too); every expert part is a view of the on-disk partition files and the model keeps no expert bytes; a fresh
process's anonymous memory does not grow by the experts (their pages are the files', which the kernel may drop);
what the tier cannot serve (a Hugging Face folder, a loader, a dtype cast) and a corrupt or truncated checkpoint
fail at load with an error that says why.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonmoe.backend.checkpoint import CheckpointError
from tritonmoe.backend.config import EngineConfig
from tritonmoe.backend.offload.host_store import PartsHostStore
from tritonmoe.backend.weights import load_for_serving
from tritonmoe.loader.convert import convert
from tritonmoe.loader.format import partition_file_name, read_index
from tritonmoe.loader.hf_model import experts_modules
from tritonmoe.tools.tiny_models import TinySpec, build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_offload_shm import (EXPERTS, NEW_TOKENS, PROMPT, converted, generate, inside_mapping,  # noqa: E402,F401
                              measure)

ONE_SLOT_PER_LAYER = f"{100 / EXPERTS}%"


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it in /proc/mounts)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype = line.split()[:3]
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def disk_config(checkpoint, **extra) -> EngineConfig:
    return EngineConfig.from_parameters({"checkpoint": str(checkpoint), "expert_cache_budget": ONE_SLOT_PER_LAYER,
                                         "expert_host_tier": "disk", **extra})


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_greedy_tokens_from_the_files_on_disk_equal_transformers(converted, reference, arch):
    from transformers import AutoTokenizer

    hf, conv = converted(arch)
    want, _ = reference(hf, PROMPT, NEW_TOKENS)
    ids = AutoTokenizer.from_pretrained(hf)(PROMPT, return_tensors="pt").input_ids
    loaded = load_for_serving(disk_config(conv), torch.device("cpu"))
    store = loaded.offloader.store
    assert isinstance(store, PartsHostStore) and not store.pinned
    ckpt = store.keepalive  # the mapping of the converted folder's own partition files
    assert Path(ckpt.path) == conv and "verify" in loaded.phases
    for layer in range(store.num_layers):
        for expert in range(store.num_experts):
            assert all(inside_mapping(src, ckpt.partitions) for src, _ in store.parts(layer, expert))
    for _, module in experts_modules(loaded.model):
        assert all(p.numel() == 0 for p in module.parameters(recurse=False)), "the model keeps no expert bytes"
    assert generate(loaded, ids) == want, arch
    assert loaded.offloader.stats()["misses"] > 0  # experts really were read from the files
    loaded.offloader.close()


def test_tokens_hold_when_every_file_page_is_dropped_before_each_step(converted, reference):
    """A host whose memory cannot keep the files: before every forward the process's pages of them are dropped and
    the page cache is asked to drop them (``madvise``/``posix_fadvise`` DONTNEED), so the experts come from the
    disk again; the tokens do not change, and each batch of copies first asked for its experts' bytes at once."""
    from transformers import AutoTokenizer

    from tritonmoe.tools.bench_disk_tier import drop_file_pages

    hf, conv = converted("qwen3_moe")
    want, _ = reference(hf, PROMPT, NEW_TOKENS)
    ids = AutoTokenizer.from_pretrained(hf)(PROMPT, return_tensors="pt").input_ids
    loaded = load_for_serving(disk_config(conv), torch.device("cpu"))
    store = loaded.offloader.store
    assert store.file_backed
    files = sorted(conv.glob("partition-*.bin"))
    # what will_need counts: right after the pages are dropped, an expert's bytes are all missing from the page
    # cache (on tmpfs, where the files' pages are their storage and cannot be dropped, none are)
    on_tmpfs = filesystem_type(conv) == "tmpfs"
    drop_file_pages(files)
    part_bytes = sum(src.numel() for src, _ in store.parts(1, 3))
    assert store.will_need(1, np.array([3])).tolist() == [0 if on_tmpfs else part_bytes]
    asked, counted, will_need = [], [], store.will_need

    def spy(layers, experts):
        asked.append(len(experts))
        counted.append(will_need(layers, experts))
        return counted[-1]

    store.will_need = spy
    before = loaded.offloader.stats()["disk_bytes"]
    hook = loaded.model.register_forward_pre_hook(lambda module, args: drop_file_pages(files))
    try:
        assert generate(loaded, ids) == want
    finally:
        hook.remove()
    stats = loaded.offloader.stats()
    assert stats["misses"] > 0 and sum(asked) >= stats["misses"]
    # every batch's count reached the stats (how many bytes were missing depends on the kernel's readahead of the
    # non-expert weights around them, so that is not asserted here)
    assert stats["disk_bytes"] - before == sum(int(c.sum()) for c in counted)
    # again without dropping: every page is cached now, nothing comes from the disk
    assert generate(loaded, ids) == want
    assert loaded.offloader.stats()["disk_bytes"] == stats["disk_bytes"]
    loaded.offloader.close()


def test_anonymous_memory_does_not_grow_by_the_experts(tmp_path):
    """A fresh process loads ~100 MB of experts with the disk tier: its anonymous memory grows by far less than the
    experts (the device cache, here host memory, of one slot per layer is 1/8 of them, plus the runtime)."""
    hf = build(TinySpec(arch="mixtral", layers=4, experts=EXPERTS, hidden=256, expert_ffn=1024, heads=4, kv_heads=2,
                        shard_mb=64), tmp_path / "hf")
    conv = convert(hf, tmp_path / "conv", progress=False).dest
    disk = measure("", conv, "disk", ONE_SLOT_PER_LAYER)
    experts = disk["experts_bytes"]
    assert experts > 90e6 and disk["store"] == "PartsHostStore"
    grow = disk["after_forward"]["anon"] - disk["before"]["anon"]
    assert grow < disk["cache_bytes"] + 0.25 * experts, (grow, experts)


def test_what_the_disk_tier_cannot_serve_is_refused_with_the_reason(converted, tmp_path):
    hf, conv = converted("mixtral")
    with pytest.raises(CheckpointError, match="needs a converted checkpoint"):
        load_for_serving(disk_config(hf), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="with loader_url"):
        load_for_serving(disk_config(conv, loader_url="http://127.0.0.1:1"), torch.device("cpu"))
    # float32 experts served as bfloat16 are not byte ranges of the file
    with pytest.raises(CheckpointError,
                       match="cannot serve the experts .* from its files: .*use expert_host_tier packed"):
        load_for_serving(disk_config(conv, dtype="bfloat16"), torch.device("cpu"))


def corrupt_copy(conv: Path, dest: Path, damage) -> Path:
    shutil.copytree(conv, dest)
    index = read_index(dest)
    expert = next(name for e in index.experts for name in e.tensors)
    entry = index.tensors[expert]
    damage(dest / partition_file_name(entry.partition), entry)
    return dest, expert


def test_a_corrupt_truncated_or_missing_partition_fails_at_load_and_names_the_damage(converted, tmp_path):
    _, conv = converted("qwen3_moe")

    def flip_a_byte(file: Path, entry):
        with open(file, "r+b") as f:
            f.seek(entry.offset + entry.bytes // 2)
            byte = f.read(1)
            f.seek(entry.offset + entry.bytes // 2)
            f.write(bytes([byte[0] ^ 0xFF]))

    bad, expert = corrupt_copy(conv, tmp_path / "flipped", flip_a_byte)
    with pytest.raises(CheckpointError, match=f"checksum mismatch for tensor '{expert}'"):
        load_for_serving(disk_config(bad), torch.device("cpu"))

    def truncate(file: Path, entry):
        with open(file, "r+b") as f:
            f.truncate(entry.offset + entry.bytes // 2)

    short, _ = corrupt_copy(conv, tmp_path / "truncated", truncate)
    with pytest.raises(CheckpointError, match="bytes but the index records"):
        load_for_serving(disk_config(short), torch.device("cpu"))

    gone, _ = corrupt_copy(conv, tmp_path / "missing", lambda file, entry: file.unlink())
    with pytest.raises(CheckpointError, match="with expert_host_tier 'disk': .*No such file"):
        load_for_serving(disk_config(gone), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (-m gpu on the GPU machine)")
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_cuda_offload_from_the_files_on_disk_matches_stock(tmp_path, arch):
    """On the GPU, bf16: experts copied (synchronously, from pageable file pages) out of the on-disk checkpoint
    give the stock model's greedy tokens."""
    from test_offload_shm import cuda_reference, divergence_report

    hf, conv, ids, want = cuda_reference(tmp_path, arch)
    want = want[0, ids.shape[1]:].tolist()
    loaded = load_for_serving(disk_config(conv, dtype="bfloat16"), torch.device("cuda", 0))
    assert not loaded.offloader.store.pinned
    got = generate(loaded, ids)
    assert got == want, divergence_report(loaded, hf, ids, torch.cat([ids[0], torch.tensor(want, device="cuda")])[None])
    assert loaded.offloader.stats()["misses"] > 0
    loaded.offloader.close()


def test_the_disk_tier_benchmark_runs_every_row_and_checks_the_tokens(tmp_path):
    """tools/bench_disk_tier.py at a toy size: every row (resident, packed, disk warm/cold, Accelerate disk
    offload warm/cold) runs in its own process and generates the resident tokens; the JSON has what the docs quote."""
    from tritonmoe.tools import bench_disk_tier

    out = tmp_path / "disk.json"
    bench_disk_tier.main(["--layers", "2", "--experts", "4", "--hidden", "64", "--expert-ffn", "128",
                          "--new-tokens", "3", "--budget", "50", "--workdir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == list(bench_disk_tier.ROWS)
    assert all("error" not in r and r["tokens_equal_resident"] for r in rows.values()), rows
    assert rows["disk cold"]["moved_mb_per_token"] > 0 and 0 <= rows["disk warm"]["hit_rate"] <= 1
    assert set(result["tpot_vs_resident"]) == set(rows) and result["tpot_vs_resident"]["resident"] == 1.0
