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
