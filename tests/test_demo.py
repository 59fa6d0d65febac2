"""The embedded demo: its committed teacher, and `glance-jax demo --quick` end to end."""

import json
import os

import numpy as np
import pytest
from diffusers import FluxTransformer2DModel as TorchFlux
from PIL import Image

from glance_jax.cli import main
from glance_jax.demo import teacher
from glance_jax.models import FluxTransformer2DModel
from torch_peers import flux_inputs, relative_error, torch_forward

METHODS = ["teacher-50", "base-uniform-10", "base-glance-schedule-10", "glance-data-10", "glance-teacher-10",
           "base-uniform-6", "base-glance-schedule-6", "glance-data-6", "glance-teacher-6"]


def test_committed_teacher_is_a_diffusers_model():
    size = sum(os.path.getsize(os.path.join(teacher.TEACHER_DIR, f)) for f in os.listdir(teacher.TEACHER_DIR))
    assert size <= 20 * 2 ** 20
    reference = TorchFlux.from_pretrained(teacher.TEACHER_DIR).eval()
    model, params = FluxTransformer2DModel.from_pretrained(teacher.TEACHER_DIR)
    inputs = flux_inputs(dict(reference.config), 2, (4, 4), teacher.TEXT_TOKENS)
    got = np.asarray(model.apply({"params": params}, **inputs))
    assert relative_error(got, torch_forward(reference, inputs)) < 1e-4
    prompts = teacher.load_prompts()
    assert set(teacher.all_captions()) <= set(prompts) and prompts[""][0].shape == (teacher.TEXT_TOKENS, 384)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--workdir", str(workdir)]) == 0
    return workdir


def test_quick_demo_writes_the_table_and_the_grid(quick_demo, capsys):
    report = json.loads((quick_demo / "metrics.json").read_text())
    assert [m["name"] for m in report["methods"]] == METHODS
    for m in report["methods"]:
        assert set(m) >= {"name", "steps", "nfe", "sec_per_image", "psnr_vs_teacher", "mse_vs_teacher", "fidelity",
                          "fd"}
        assert all(np.isfinite(v) for k, v in m.items() if k != "name")
    by_name = {m["name"]: m for m in report["methods"]}
    assert by_name["teacher-50"]["mse_vs_teacher"] == 0 and by_name["base-uniform-6"]["nfe"] == 6
    assert report["train_sample"]["caption"] == "a handwritten seven"
    grid = Image.open(quick_demo / "grid.png")
    assert grid.size[0] > 10 * 40 and grid.size[1] > len(METHODS) * 40


def test_demo_loras_load_into_diffusers(quick_demo):
    reference = TorchFlux.from_pretrained(teacher.TEACHER_DIR)
    folder = quick_demo / "loras" / "data-10"
    reference.load_lora_adapter(str(folder), weight_name="slow_lora.safetensors", prefix="transformer")
    config = reference.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (4, 16.0)


def test_sample_and_eval_commands(quick_demo, tmp_path, capsys):
    loras = quick_demo / "loras" / "teacher-10"
    lora_args = ["--slow_lora", str(loras / "slow_lora.safetensors"),
                 "--fast_lora", str(loras / "fast_lora.safetensors")]
    out = tmp_path / "three.png"
    assert main(["sample", "--prompt", "the numeral three, written by hand", "--out", str(out), *lora_args]) == 0
    assert Image.open(out).size == (8, 8)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the numeral three, written by hand\nthe number five\n")
    assert main(["eval", "--prompts", str(prompts), "--seeds", "0,1", "--workdir", str(tmp_path / "eval"),
                 *lora_args]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["base-50", "glance-10"]
    assert 10 < report["runs"][1]["psnr_vs_base"] < 100 and 0 < report["runs"][1]["ssim_vs_base"] <= 1
    assert (tmp_path / "eval" / "grid.png").exists()
    capsys.readouterr()


@pytest.mark.parametrize("args,message", [
    (["sample", "--prompt", "a cat", "--out", "x.png"], "has no embeddings for 'a cat'"),
    (["sample", "--prompt", "the number five", "--out", "x.png", "--schedule", "1,2"], "--schedule '1,2'"),
    (["eval", "--prompts", "/nonexistent.txt"], "no such prompt file"),
    (["demo", "--no-such-flag"], None),
])
def test_bad_arguments_give_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if message is None:  # argparse's refusals are one line too, with its exit status 2
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unrecognized arguments" in err[0]
        return
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"glance-jax {args[0]}: error:") and message in err[-1]
