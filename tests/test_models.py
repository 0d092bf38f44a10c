"""Embedded models: the converted teacher cache is checked, and a broken one is rebuilt."""

import json
from pathlib import Path

from raydag.models import _write_manifest, cache_is_valid, embedded_student_path, resolve_model


def test_manifest_detects_partial_and_corrupt_folders(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"a": 1}))
    (folder / "model.safetensors").write_bytes(b"\x00" * 1000)
    assert not cache_is_valid(folder)  # no manifest yet: a conversion that never finished
    _write_manifest(folder)
    assert cache_is_valid(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")  # same size, new bytes
    assert not cache_is_valid(folder)
    _write_manifest(folder)
    (folder / "config.json").unlink()
    assert not cache_is_valid(folder)


def test_embedded_teacher_is_converted_once_into_a_checked_cache():
    path = Path(resolve_model("embedded:smollm2-135m-instruct"))
    assert cache_is_valid(path)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert Path(resolve_model("embedded:smollm2-135m-instruct")) == path
    assert weights.stat().st_mtime_ns == before  # reused, not converted again


def test_corrupt_teacher_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDAG_CACHE", str(tmp_path))
    first = Path(resolve_model("embedded:smollm2-135m-instruct"))
    with open(first / "model.safetensors", "r+b") as handle:  # flip bytes inside the weights
        handle.seek(4096)
        handle.write(b"\xff" * 64)
    assert not cache_is_valid(first)
    again = Path(resolve_model("embedded:smollm2-135m-instruct"))
    assert again == first and cache_is_valid(again)


def test_student_comes_from_its_wheel_and_other_refs_pass_through(tmp_path):
    assert (embedded_student_path() / "model.safetensors").is_file()
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-1.7B-Instruct") == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
