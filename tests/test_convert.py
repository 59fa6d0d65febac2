"""The converter and loader on bad input: one clear line, a non-zero exit, nothing half-written."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from diffusers import FluxTransformer2DModel as TorchFlux

from glance_jax import families
from glance_jax.checkpoints import safetensors_io
from glance_jax.cli import main
from glance_jax.errors import GlanceError
from glance_jax.models import FluxTransformer2DModel
from torch_peers import randomize_

CONFIG = dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=[2, 2, 4])
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    randomize_(TorchFlux(**CONFIG), seed=0).save_pretrained(path)
    return path


def broken_copy(good, tmp_path, edit_tensors=None, edit_config=None):
    """A copy of the good folder with its tensors or config edited."""
    path = tmp_path / "src"
    shutil.copytree(good, path)
    if edit_tensors:
        f = safetensors_io.SafetensorsFile(path / WEIGHTS)
        tensors = {name: f.read(name) for name in f.keys()}
        edit_tensors(tensors)
        safetensors_io.save_file(tensors, path / WEIGHTS)
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    return path


def run_convert(capsys, src, dst, *extra):
    code = main(["convert", str(src), str(dst), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def assert_fails_cleanly(capsys, src, tmp_path, *expected):
    dst = tmp_path / "out"
    code, line = run_convert(capsys, src, dst)
    assert code == 1
    assert line.startswith("glance-jax convert: error: ")
    for text in expected:
        assert text in line, line
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_good_folder_converts(capsys, good, tmp_path):
    code, _ = run_convert(capsys, good, tmp_path / "out", "--dtype", "bf16")
    assert code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "glance_jax.json", "params"]
    assert json.loads((tmp_path / "out" / "glance_jax.json").read_text())["dtype"] == "bfloat16"
    model, params = FluxTransformer2DModel.from_pretrained(tmp_path / "out", dtype="bf16")
    assert model.num_layers == 1 and str(params["proj_out"]["kernel"].dtype) == "bfloat16"


def test_missing_key(capsys, good, tmp_path):
    src = broken_copy(good, tmp_path, edit_tensors=lambda t: t.pop("transformer_blocks.0.attn.to_k.weight"))
    assert_fails_cleanly(capsys, src, tmp_path, "1 missing keys", "transformer_blocks.0.attn.to_k.weight")


def test_unexpected_key(capsys, good, tmp_path):
    def add(t):
        t["transformer_blocks.0.attn.to_k.lora_A.weight"] = np.zeros((4, 16), np.float32)
    src = broken_copy(good, tmp_path, edit_tensors=add)
    assert_fails_cleanly(capsys, src, tmp_path, "1 unexpected keys", "transformer_blocks.0.attn.to_k.lora_A.weight")


def test_shape_mismatch(capsys, good, tmp_path):
    def widen(t):
        t["context_embedder.weight"] = np.zeros((16, 13), np.float32)
    src = broken_copy(good, tmp_path, edit_tensors=widen)
    assert_fails_cleanly(capsys, src, tmp_path, "shape mismatch", "context_embedder.weight", "(16, 13)", "(16, 12)")


def test_truncated_file(capsys, good, tmp_path):
    src = broken_copy(good, tmp_path)
    size = os.path.getsize(src / WEIGHTS)
    with open(src / WEIGHTS, "r+b") as f:
        f.truncate(size - 100)
    assert_fails_cleanly(capsys, src, tmp_path, "truncated", WEIGHTS)


def test_not_a_safetensors_file(capsys, tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"PK\x03\x04 this is a zip archive, not safetensors" * 10)
    assert_fails_cleanly(capsys, src, tmp_path, "not a safetensors file", str(src))


def test_foreign_safetensors_file(capsys, tmp_path):
    src = tmp_path / "clip.safetensors"
    safetensors_io.save_file({"text_model.embeddings.weight": np.zeros((4, 4), np.float32)}, src)
    assert_fails_cleanly(capsys, src, tmp_path, "not a Black Forest Labs FLUX checkpoint")


def test_unknown_class_name(capsys, good, tmp_path):
    src = broken_copy(good, tmp_path, edit_config=lambda c: c.update(_class_name="SD3Transformer2DModel"))
    assert_fails_cleanly(capsys, src, tmp_path, "unknown _class_name 'SD3Transformer2DModel'")


def test_missing_source(capsys, tmp_path):
    assert_fails_cleanly(capsys, tmp_path / "nowhere", tmp_path, "no such file or folder")


def test_destination_exists(capsys, good, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, line = run_convert(capsys, good, dst)
    assert code == 1 and "already exists" in line and "--overwrite" in line
    assert (dst / "keep.txt").read_text() == "mine"
    code, _ = run_convert(capsys, good, dst, "--overwrite")
    assert code == 0 and not (dst / "keep.txt").exists() and (dst / "glance_jax.json").exists()


def test_failure_during_write_leaves_nothing(good, tmp_path, monkeypatch):
    """A crash after some tensors were written must not leave a half-written destination."""
    from glance_jax import checkpoints

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoints, "save_converted", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.convert_checkpoint(good, tmp_path / "out", families.CLASSES)
    assert os.listdir(tmp_path) == []


def test_loader_raises_the_same_errors(good, tmp_path):
    with pytest.raises(GlanceError, match="no such file"):
        FluxTransformer2DModel.from_pretrained(good / "missing")
    src = broken_copy(good, tmp_path, edit_tensors=lambda t: t.pop("proj_out.bias"))
    with pytest.raises(GlanceError, match="missing keys.*proj_out.bias"):
        FluxTransformer2DModel.from_pretrained(src)


SUBCOMMANDS = ("convert", "export-lora", "train", "sample", "eval", "demo")


@pytest.mark.parametrize("args", [["--help"]] + [[c, "--help"] for c in SUBCOMMANDS])
def test_help(args):
    out = subprocess.run([sys.executable, "-m", "glance_jax.cli", *args], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage:" in out.stdout and ("example" in out.stdout or "subcommands" in out.stdout)


def test_unknown_subcommand(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err


