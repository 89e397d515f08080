"""The reader against converted checkpoints: bit-exact round trips, expert ranges, faults, and model loading."""

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tritonmoe.loader.convert import convert
from tritonmoe.loader.format import (ALIGNMENT, INDEX_FILE, CheckpointError, ChecksumError, align_up,
                                     partition_file_name, read_index)
from tritonmoe.loader.hf_model import load_hf_model
from tritonmoe.loader.reader import CheckpointReader, load_state_dict
from tritonmoe.tools.tiny_models import TinySpec, build

TINY = {  # architecture -> dtype: several architectures, several dtypes
    "mixtral": "float32",
    "qwen3_moe": "bfloat16",
    "deepseek_v3": "float16",
    "olmoe": "bfloat16",
}


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """arch -> (HF folder, converted folder)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch, dtype in TINY.items():
        hf = build(TinySpec(arch=arch, dtype=dtype, layers=2, experts=4), root / arch)
        out[arch] = (hf, convert(hf, root / f"{arch}-converted", progress=False).dest)
    return out


def source_tensors(hf_folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(hf_folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def assert_exact(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, want in expected.items():
        have = got[name]
        assert (have.dtype, have.shape, have.stride()) == (want.dtype, want.shape, want.stride()), name
        assert same_bits(have, want), name
        if not want.dtype.is_floating_point or want.element_size() > 1:  # torch.equal has no fp8 kernels on CPU
            assert torch.equal(have, want), name


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    """A hand-made sharded checkpoint holding every supported dtype, a scalar, an empty tensor and experts."""
    root = tmp_path_factory.mktemp("dtypes")
    gen = torch.Generator().manual_seed(0)
    bits = lambda shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)  # noqa: E731
    shard1 = {
        "model.embed_tokens.weight": torch.randn(33, 16, generator=gen).to(torch.bfloat16),
        "model.scale": torch.tensor(3.5, dtype=torch.float64),
        "model.empty": torch.empty(0, 7, dtype=torch.float16),
        "model.mask": torch.rand(5, 3, generator=gen) > 0.5,
        "model.ids": torch.randint(-2**62, 2**62, (9,), dtype=torch.int64, generator=gen),
        "model.codes": torch.randint(-128, 127, (17, 5), dtype=torch.int8, generator=gen),
        "model.u8": bits((1000,)),
        "model.i32": torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32, generator=gen),
    }
    shard2 = {}
    for e in range(3):
        prefix = f"model.layers.0.mlp.experts.{e}"
        # fp8 from raw bits: every pattern, NaNs included, must survive
        shard2[f"{prefix}.gate_proj.weight"] = bits((24, 16)).view(torch.float8_e4m3fn)
        shard2[f"{prefix}.up_proj.weight"] = bits((24, 16)).view(torch.float8_e5m2)
        shard2[f"{prefix}.down_proj.weight"] = torch.randn(16, 24, generator=gen)
        shard2[f"{prefix}.gate_proj.weight_scale_inv"] = torch.rand(1, 1, generator=gen)
    save_file(shard1, root / "model-00001-of-00002.safetensors")
    save_file(shard2, root / "model-00002-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in shard1}
    weight_map |= {n: "model-00002-of-00002.safetensors" for n in shard2}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text("{}")
    return root, {**shard1, **shard2}


@pytest.mark.parametrize("arch", TINY)
def test_round_trip_is_bit_exact_for_each_architecture(tiny_pairs, arch):
    hf, converted = tiny_pairs[arch]
    expected = source_tensors(hf)
    # transformers may keep a router in fp32 (_keep_in_fp32_modules: DeepSeek-V3's gate since 5.2x); the rest is
    # the tiny model's dtype, and the round trip must keep both
    dtypes = {t.dtype for n, t in expected.items() if ".mlp.gate." not in n}
    assert dtypes == {getattr(torch, TINY[arch])}
    assert_exact(expected, load_state_dict(converted))


def test_round_trip_is_bit_exact_for_every_dtype(every_dtype, tmp_path):
    hf, expected = every_dtype
    converted = convert(hf, tmp_path / "out", progress=False).dest
    assert_exact(expected, load_state_dict(converted))
    with CheckpointReader(converted) as reader:
        for name in ("model.scale", "model.empty", "model.layers.0.mlp.experts.1.up_proj.weight"):
            assert_exact({name: expected[name]}, {name: reader.read_tensor(name)})


def test_small_partitions_and_chunks_still_round_trip(every_dtype, tmp_path):
    hf, expected = every_dtype
    converted = convert(hf, tmp_path / "out", partition_bytes=2 * ALIGNMENT, progress=False).dest
    index = read_index(converted)
    assert len(index.partitions) > 3
    assert_exact(expected, load_state_dict(converted, threads=3, chunk_bytes=ALIGNMENT))


@pytest.mark.parametrize("arch", TINY)
def test_each_expert_is_one_aligned_contiguous_range(tiny_pairs, arch):
    hf, converted = tiny_pairs[arch]
    index = read_index(converted)
    spec_layers_with_experts = 1 if arch.startswith("deepseek") else 2  # deepseek's first layer is dense
    assert len(index.experts) == spec_layers_with_experts * 4
    for e in index.experts:
        assert e.offset % ALIGNMENT == 0 and len(e.tensors) == 3
        inside = sorted((t.offset, n) for n, t in index.tensors.items()
                        if t.partition == e.partition and e.offset <= t.offset < e.offset + e.bytes)
        assert [n for _, n in inside] == sorted(e.tensors, key=lambda n: index.tensors[n].offset)
        assert all(f".experts.{e.expert}." in n for n in e.tensors)
        assert e.bytes == sum(align_up(index.tensors[n].bytes) for n in e.tensors[:-1]) + \
            index.tensors[e.tensors[-1]].bytes
    first_expert_offset = min(e.offset for e in index.experts if e.partition == 0)
    assert all(t.offset < first_expert_offset for n, t in index.tensors.items()
               if ".experts." not in n and t.partition == 0), "non-expert tensors come first"


def test_read_expert_moves_an_expert_with_one_range(tiny_pairs):
    hf, converted = tiny_pairs["mixtral"]
    expected = source_tensors(hf)
    with CheckpointReader(converted) as reader:
        tensors = reader.read_expert(1, 2)
        assert set(tensors) == {f"model.layers.1.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w2", "w3")}
        assert_exact({n: expected[n] for n in tensors}, tensors)
        entry = reader.index.expert(1, 2)
        dest = bytearray(entry.bytes + 3)  # a plain unaligned buffer works too (buffered path)
        reader.read_expert_into(1, 2, memoryview(dest)[3:])
    raw = (converted / partition_file_name(entry.partition)).read_bytes()[entry.offset:entry.offset + entry.bytes]
    assert dest[3:] == raw


def test_direct_io_is_used_where_the_filesystem_allows_it(tiny_pairs):
    _, converted = tiny_pairs["mixtral"]
    probe = converted / "probe"
    probe.write_bytes(bytes(ALIGNMENT))
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        supported = True
    except OSError:
        supported = False
    finally:
        probe.unlink()
    with CheckpointReader(converted) as reader:
        assert reader.uses_direct_io == supported
    with CheckpointReader(converted, direct=False) as reader:
        assert not reader.uses_direct_io


def _opens_with_o_direct(flags: int) -> bool:
    return bool(flags & os.O_DIRECT)


def test_filesystem_refusing_direct_io_falls_back_to_buffered_and_says_so(tiny_pairs, caplog, monkeypatch):
    hf, converted = tiny_pairs["mixtral"]
    real_open = os.open

    def open_like_an_old_tmpfs(path, flags, *args):
        if _opens_with_o_direct(flags):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_like_an_old_tmpfs)
    with caplog.at_level(logging.INFO, logger="tritonmoe.loader"):
        with CheckpointReader(converted) as reader:
            assert not reader.uses_direct_io
            got = reader.load_state_dict()
    assert "O_DIRECT unavailable" in caplog.text and "EINVAL" in caplog.text and "buffered" in caplog.text
    assert_exact(source_tensors(hf), got)


def test_direct_reads_failing_at_read_time_fall_back_to_buffered(tiny_pairs, caplog, monkeypatch):
    hf, converted = tiny_pairs["mixtral"]
    with CheckpointReader(converted) as reader:
        if not reader.uses_direct_io:
            pytest.skip("this filesystem has no O_DIRECT to fail")
        real_preadv = os.preadv

        def preadv_like_some_network_filesystems(fd, buffers, offset):
            if _opens_with_o_direct(fcntl.fcntl(fd, fcntl.F_GETFL)):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv_like_some_network_filesystems)
        with caplog.at_level(logging.WARNING, logger="tritonmoe.loader"):
            got = reader.load_state_dict()
        assert not reader.uses_direct_io
    assert "O_DIRECT reads fail" in caplog.text
    assert_exact(source_tensors(hf), got)


@pytest.fixture
def scratch_copy(tiny_pairs, tmp_path):
    """A converted mixtral checkpoint this test may damage."""
    _, converted = tiny_pairs["mixtral"]
    return Path(shutil.copytree(converted, tmp_path / "ckpt"))


def test_bit_flip_raises_an_error_naming_the_tensor(scratch_copy):
    index = read_index(scratch_copy)
    victim = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    entry = index.tensors[victim]
    path = scratch_copy / partition_file_name(entry.partition)
    with open(path, "r+b") as f:
        f.seek(entry.offset + entry.bytes // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(ChecksumError, match=victim.replace(".", r"\.")) as err:
        load_state_dict(scratch_copy)
    assert err.value.tensor == victim
    with CheckpointReader(scratch_copy) as reader:
        with pytest.raises(ChecksumError, match="experts.3.w2"):
            reader.read_expert(1, 3)
        with pytest.raises(ChecksumError):
            reader.verify()
        reader.read_expert(1, 2)  # other experts are intact
        unchecked = reader.load_state_dict(verify=False)[victim]  # verify=False skips the check (a choice)
    assert not torch.equal(unchecked, original_tensor(scratch_copy, victim))


def original_tensor(converted: Path, name: str) -> torch.Tensor:
    """What the tensor held before any damage, from the pristine HF source of the fixture."""
    source = json.loads((converted / INDEX_FILE).read_text())["source"]["path"]
    return source_tensors(Path(source))[name]


def test_truncated_partition_is_refused_before_reading(scratch_copy):
    path = scratch_copy / partition_file_name(0)
    size = path.stat().st_size
    os.truncate(path, size - ALIGNMENT)
    with pytest.raises(CheckpointError, match=rf"{size - ALIGNMENT} bytes but the index records {size}.*truncated"):
        CheckpointReader(scratch_copy)


def test_index_that_does_not_match_the_data_is_refused(scratch_copy):
    path = scratch_copy / INDEX_FILE
    doc = json.loads(path.read_text())
    doc["partitions"][0]["bytes"] += ALIGNMENT  # an index from another conversion
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="does not match the data"):
        load_state_dict(scratch_copy)


def test_swapped_index_entries_are_caught_by_checksums(scratch_copy):
    path = scratch_copy / INDEX_FILE
    doc = json.loads(path.read_text())
    a, b = "model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.block_sparse_moe.experts.0.w3.weight"
    doc["tensors"][a]["checksum"], doc["tensors"][b]["checksum"] = doc["tensors"][b]["checksum"], \
        doc["tensors"][a]["checksum"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ChecksumError) as err:
        load_state_dict(scratch_copy)
    assert err.value.tensor in (a, b)


def test_stray_partition_file_is_refused(scratch_copy):
    (scratch_copy / partition_file_name(7)).write_bytes(bytes(ALIGNMENT))
    with pytest.raises(CheckpointError, match="partition-00007.bin are not in the index"):
        CheckpointReader(scratch_copy)


def test_missing_partition_is_refused(scratch_copy):
    (scratch_copy / partition_file_name(0)).unlink()
    with pytest.raises(CheckpointError, match="partition-00000.bin is missing"):
        CheckpointReader(scratch_copy)


def test_folder_without_index_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a converted tritonmoe checkpoint"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("arch", TINY)
def test_load_hf_model_generates_exactly_like_from_pretrained(tiny_pairs, arch):
    from transformers import AutoModelForCausalLM

    hf, converted = tiny_pairs[arch]
    reference = AutoModelForCausalLM.from_pretrained(hf)
    ours = load_hf_model(converted)
    assert type(ours) is type(reference) and ours.dtype == reference.dtype == getattr(torch, TINY[arch])
    want, have = reference.state_dict(), ours.state_dict()
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    prompt = torch.tensor([[1, 17, 42, 99, 7, 250]])
    expected = reference.generate(prompt, max_new_tokens=16, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=16, do_sample=False)
    assert expected.shape[1] > prompt.shape[1]
    assert torch.equal(got, expected)
    assert ours.generation_config.eos_token_id == reference.generation_config.eos_token_id == 2


def test_load_hf_model_refuses_a_checkpoint_missing_weights(scratch_copy):
    path = scratch_copy / INDEX_FILE
    doc = json.loads(path.read_text())
    del doc["tensors"]["model.norm.weight"]
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_hf_model(scratch_copy)


def test_load_state_dict_into_caller_buffers_makes_views_of_them(tiny_pairs):
    hf, converted = tiny_pairs["qwen3_moe"]
    index = read_index(converted)
    buffers = [torch.zeros(n, dtype=torch.uint8) for n in index.partitions]  # e.g. a shared-memory pool
    with CheckpointReader(converted) as reader:
        got = reader.load_state_dict(buffers=buffers)
        with pytest.raises(ValueError, match="partition sizes"):
            reader.load_state_dict(buffers=[torch.zeros(1, dtype=torch.uint8)])
        with pytest.raises(ValueError, match="outside partition"):
            reader.read_range_into(0, index.partitions[0] - ALIGNMENT, memoryview(bytearray(2 * ALIGNMENT)))
    assert_exact(source_tensors(hf), got)
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    entry = index.tensors[name]
    assert got[name].data_ptr() == buffers[entry.partition].data_ptr() + entry.offset
