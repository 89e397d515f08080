"""The converter: what it writes beside the weights, when it refuses, and that failures leave nothing behind."""

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tritonmoe.loader import convert as convert_module
from tritonmoe.loader.convert import PartitionWriter, convert, main
from tritonmoe.loader.format import INDEX_FILE, CheckpointError, partition_file_name, read_index
from tritonmoe.loader.reader import load_state_dict
from tritonmoe.tools.tiny_models import TinySpec, build


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "mixtral": build(TinySpec(arch="mixtral", experts=4), root / "mixtral"),
        "qwen3_moe": build(TinySpec(arch="qwen3_moe", experts=4), root / "qwen3_moe"),
    }


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_side_files_are_copied_and_weights_are_not(models, tmp_path):
    hf = models["mixtral"]
    result = convert(hf, tmp_path / "out", progress=False)
    assert result.converted
    out = result.dest
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes()
    assert not list(out.glob("*.safetensors*"))
    assert sorted(read_index(out).side_files) == sorted(p.name for p in hf.iterdir()
                                                        if not p.name.startswith("model"))


def test_single_file_checkpoint_converts(models, tmp_path):
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    AutoModelForCausalLM.from_pretrained(models["qwen3_moe"]).save_pretrained(single, max_shard_size="1GB")
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    out = convert(single, tmp_path / "out", progress=False).dest
    expected = load_file(single / "model.safetensors")
    got = load_state_dict(out)
    assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in expected)


def test_same_model_again_is_a_no_op(models, tmp_path):
    hf = models["mixtral"]
    dest = convert(hf, tmp_path / "out", progress=False).dest
    stamp = (dest / partition_file_name(0)).stat().st_mtime_ns
    again = convert(hf, dest, progress=False)
    assert not again.converted
    assert (dest / partition_file_name(0)).stat().st_mtime_ns == stamp


def test_same_model_with_touched_files_is_recognised_by_content(models, tmp_path):
    hf = Path(shutil.copytree(models["mixtral"], tmp_path / "hf"))
    dest = convert(hf, tmp_path / "out", progress=False).dest
    for p in hf.iterdir():
        os.utime(p, ns=(1, 1))  # e.g. copied to another disk: dates change, contents do not
    assert not convert(hf, dest, progress=False).converted


def test_same_model_with_force_is_reconverted(models, tmp_path):
    hf = models["mixtral"]
    dest = convert(hf, tmp_path / "out", progress=False).dest
    stamp = (dest / partition_file_name(0)).stat().st_mtime_ns
    assert convert(hf, dest, force=True, progress=False).converted
    assert (dest / partition_file_name(0)).stat().st_mtime_ns != stamp


def test_different_model_is_refused_and_left_alone(models, tmp_path):
    dest = convert(models["mixtral"], tmp_path / "out", progress=False).dest
    before = read_index(dest).fingerprint
    with pytest.raises(FileExistsError, match="different model.*--force"):
        convert(models["qwen3_moe"], dest, progress=False)
    assert read_index(dest).fingerprint == before
    replaced = convert(models["qwen3_moe"], dest, force=True, progress=False)
    assert replaced.converted and read_index(dest).fingerprint != before
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in load_state_dict(dest)
    assert siblings(dest) == ["out"]  # neither staging nor the replaced checkpoint is left behind


def test_non_checkpoint_folder_is_never_replaced(models, tmp_path):
    dest = tmp_path / "precious"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="not a tritonmoe checkpoint"):
            convert(models["mixtral"], dest, force=force, progress=False)
    assert (dest / "notes.txt").read_text() == "keep me"


def test_empty_destination_folder_is_used(models, tmp_path):
    (tmp_path / "out").mkdir()
    assert convert(models["mixtral"], tmp_path / "out", progress=False).converted
    assert (tmp_path / "out" / INDEX_FILE).is_file()


def _fill_disk_after(monkeypatch, allowed_bytes: int) -> None:
    written = {"n": 0}
    real_write = PartitionWriter.write

    def write(self, data):
        if written["n"] + len(data) > allowed_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        written["n"] += len(data)
        real_write(self, data)

    monkeypatch.setattr(PartitionWriter, "write", write)


@pytest.mark.parametrize("allowed_bytes", [0, 200_000])
def test_full_disk_leaves_no_checkpoint_behind(models, tmp_path, monkeypatch, allowed_bytes):
    _fill_disk_after(monkeypatch, allowed_bytes)
    dest = tmp_path / "out"
    with pytest.raises(OSError, match="no space left") as err:
        convert(models["mixtral"], dest, progress=False)
    assert err.value.errno == errno.ENOSPC
    assert not dest.exists()
    assert siblings(dest) == []  # the staging folder was removed too


def test_full_disk_while_replacing_keeps_the_old_checkpoint(models, tmp_path, monkeypatch):
    dest = convert(models["mixtral"], tmp_path / "out", progress=False).dest
    before = load_state_dict(dest)
    _fill_disk_after(monkeypatch, 100_000)
    with pytest.raises(OSError, match="no space left"):
        convert(models["qwen3_moe"], dest, force=True, progress=False)
    after = load_state_dict(dest)
    assert after.keys() == before.keys() and all(after[k].equal(before[k]) for k in before)
    assert siblings(dest) == ["out"]


def test_failure_writing_the_index_leaves_no_checkpoint(models, tmp_path, monkeypatch):
    def no_room(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_module, "_write_durably", no_room)
    with pytest.raises(OSError):
        convert(models["mixtral"], tmp_path / "out", progress=False)
    assert siblings(tmp_path / "out") == []


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out", progress=False)


def test_source_without_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        convert(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _corrupt_copy(models, tmp_path, damage) -> tuple[Path, str]:
    src = Path(shutil.copytree(models["mixtral"], tmp_path / "src"))
    shard = sorted(src.glob("*.safetensors"))[1]
    damage(shard)
    return src, shard.name


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"\x05\x00"), "too short"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header length"),
    (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json" + bytes(64)), "not valid JSON"),
    (lambda p: os.truncate(p, p.stat().st_size - 100), "does not match shape"),
])
def test_corrupt_safetensors_is_a_clear_error_naming_the_file(models, tmp_path, damage, message):
    src, shard_name = _corrupt_copy(models, tmp_path, damage)
    with pytest.raises(CheckpointError, match=message) as err:
        convert(src, tmp_path / "out", progress=False)
    assert shard_name in str(err.value)
    assert not (tmp_path / "out").exists()


def test_shard_index_naming_a_missing_shard_is_a_clear_error(models, tmp_path):
    src, shard_name = _corrupt_copy(models, tmp_path, lambda p: p.unlink())
    with pytest.raises(CheckpointError, match=f"missing: {shard_name}"):
        convert(src, tmp_path / "out", progress=False)


def test_cli_converts_then_reports_no_op_then_refuses(models, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main([str(models["mixtral"]), str(dest), "--quiet"]) == 0
    assert "converted" in capsys.readouterr().out
    assert main([str(models["mixtral"]), str(dest), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main([str(models["qwen3_moe"]), str(dest), "--quiet"]) == 2
    assert "different model" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_shows_a_progress_bar(models, tmp_path, capsys):
    assert main([str(models["mixtral"]), str(tmp_path / "out")]) == 0
    assert "converting mixtral" in capsys.readouterr().err


def test_index_records_where_it_came_from(models, tmp_path):
    dest = convert(models["mixtral"], tmp_path / "out", progress=False).dest
    doc = json.loads((dest / INDEX_FILE).read_text())
    assert doc["format_version"] == 1 and doc["alignment"] == 4096
    assert doc["source"]["path"] == str(models["mixtral"].absolute())
