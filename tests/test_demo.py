"""The embedded demo: its committed teacher, and `glance-jax demo --quick` end to end."""

import json
import os

import numpy as np
import pytest
from diffusers import FluxTransformer2DModel as TorchFlux
from PIL import Image

from glance_jax import evaluation, lora
from glance_jax.checkpoints import safetensors_io
from glance_jax.cli import main
from glance_jax.demo import PROMPT_TEMPLATES, VALIDATION_TEMPLATES, prompt_set
from glance_jax.demo import teacher
from glance_jax.models import FluxTransformer2DModel
from torch_peers import flux_inputs, relative_error, torch_forward

METHODS = ["teacher-50", "base-uniform-10", "base-uniform-6", "base-uniform-4", "base-uniform-3", "base-fitted-6",
           "base-fitted-4", "glance-10", "glance-6", "glance-4", "glance-3", "glance-official-10", "glance-data-10",
           "teacher-50-cfg", "base-cfg-uniform-10", "base-cfg-uniform-6", "base-cfg-uniform-5", "base-cfg-uniform-4",
           "glance-cfg2-6", "glance-cfg2-5", "glance-cfg1-6", "glance-ginput-6"]


def test_prompt_set_names_each_images_template():
    captions, batch, labels, template_of, seeds = prompt_set(teacher, PROMPT_TEMPLATES, 2, 0, "the number seven")
    assert len(captions) == 19 and len(batch) == len(labels) == len(template_of) == len(seeds) == 38
    for caption, digit, i in zip(batch, labels, template_of):
        assert caption == teacher.caption(PROMPT_TEMPLATES[i], digit)


def test_validation_and_held_out_prompts_are_apart_and_each_has_an_unseen_paraphrase():
    reported, validated = set(PROMPT_TEMPLATES), set(VALIDATION_TEMPLATES)
    assert not reported & validated
    for templates in (reported, validated):
        assert len(templates & set(teacher.UNSEEN_TEMPLATES)) == 1
        assert templates & set(teacher.TRAIN_TEMPLATES)


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
    assert main(["demo", "--quick", "--all", "--workdir", str(workdir)]) == 0
    return workdir


def test_quick_demo_writes_the_table_and_the_grid(quick_demo, capsys):
    report = json.loads((quick_demo / "metrics.json").read_text())
    assert [m["name"] for m in report["methods"]] == METHODS
    by_name = {m["name"]: m for m in report["methods"]}
    for m in report["methods"]:
        assert set(m) >= {"name", "steps", "nfe", "sec_per_image", "psnr_vs_teacher", "psnr_train_caption",
                          "mse_vs_teacher", "fidelity", "fd", "kind", "schedule", "target", "guidance", "reference"}
        assert all(np.isfinite(m[k]) for k in ("nfe", "psnr_vs_teacher", "psnr_train_caption", "fidelity", "fd"))
        guided = m["reference"] == "teacher-50-cfg"
        assert m["guidance"] == (3.0 if guided else 1.0) and m["reference"] in by_name
        assert (m["kind"] == "glance") == m["name"].startswith("glance-")
        assert m["target"] == (None if m["kind"] == "base" else "data" if m["name"] == "glance-data-10" else "teacher")
        k = int(m["name"].replace("-cfg", "").split("-")[-1])
        # honest pass counting: a guided base step and a two-pass Glance step are two passes, a one-pass Glance
        # step one (guidance distilled)
        two_pass = guided and (m["kind"] == "base" or m["name"].startswith("glance-cfg2-"))
        assert m["nfe"] == (2 * k if two_pass else k)
    assert by_name["teacher-50"]["mse_vs_teacher"] == 0 == by_name["teacher-50-cfg"]["mse_vs_teacher"]
    assert by_name["glance-official-10"]["schedule"] == "official" and by_name["base-fitted-4"]["schedule"] == "fitted"
    for m in report["methods"]:  # the speed-ups come from the base-uniform rows of the same reference
        if m["kind"] != "glance":
            assert "speedup" not in m
            continue
        base = [b for b in report["methods"] if b["kind"] == "base" and b["schedule"] == "uniform"
                and b["reference"] == m["reference"] and b["name"] != m["reference"]]
        assert len(base) == 4
        expected = evaluation.speedup([b["nfe"] for b in base], [b["psnr_vs_teacher"] for b in base],
                                      m["psnr_vs_teacher"], m["nfe"])
        assert (m["equivalent_base_nfe"], m["speedup"]) == pytest.approx(expected[:2])
    assert report["train_sample"]["caption"] == "a handwritten seven"
    for m in report["methods"]:  # equal images per held-out template: the overall PSNR is their mean
        assert list(m["psnr_by_template"]) == list(PROMPT_TEMPLATES)
        assert np.mean(list(m["psnr_by_template"].values())) == pytest.approx(m["psnr_vs_teacher"], rel=1e-9)
    assert [line.split(":")[0] for line in report["by_template"]] == [
        "by prompt template, glance-6 vs base-uniform-10 (dB)",
        "by prompt template, glance-cfg2-6 vs base-cfg-uniform-10 (dB)",
        "by prompt template, glance-cfg1-6 vs base-cfg-uniform-10 (dB)"]
    assert [line.split(":")[0] for line in report["closing"]] == ["unguided", "guided"]
    assert "base-uniform-10" in report["closing"][0] and "base-cfg-uniform-10" in report["closing"][1]
    grid = Image.open(quick_demo / "grid.png")
    assert grid.size[0] > 10 * 40 and grid.size[1] > len(METHODS) * 40
    schedule = lora.read_schedule(quick_demo / "loras" / "glance-6" / "slow_lora.safetensors")
    assert schedule.num_steps == 6 and schedule.slow == tuple(by_name["glance-6"]["timesteps"][:3])
    for pair, regime in (("glance-6", (1.0, None, 1)), ("glance-cfg1-6", (1.0, None, 1)),
                         ("glance-cfg2-6", (3.0, "", 2)), ("glance-ginput-6", (1.0, None, 1))):
        got = lora.read_guidance(quick_demo / "loras" / pair / "fast_lora.safetensors")  # how each pair samples
        assert (got["true_cfg_scale"], got["negative_prompt"], got["passes_per_step"]) == regime
        assert ("guidance_input" in got) == (pair == "glance-ginput-6")


@pytest.mark.parametrize("pair,rank,alpha", [("glance-data-10", 4, 16.0), ("glance-10", 16, 64.0)])
def test_demo_loras_load_into_diffusers(quick_demo, pair, rank, alpha):
    reference = TorchFlux.from_pretrained(teacher.TEACHER_DIR)
    reference.load_lora_adapter(str(quick_demo / "loras" / pair), weight_name="slow_lora.safetensors",
                                prefix="transformer")
    config = reference.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (rank, rank)  # the scale alpha / r is folded into lora_B
    tensors = safetensors_io.SafetensorsFile(quick_demo / "loras" / pair / "slow_lora.safetensors")
    assert set(json.loads(tensors.metadata["glance_lora_alpha"]).values()) == {alpha}  # the trained alpha, kept
    adapted = [n for n, _ in reference.named_parameters() if n.endswith(".lora_A.default_0.weight")]
    assert len(adapted) == (52 if pair == "glance-10" else 20)  # flux-all: every Dense layer of the 6 blocks


def test_sample_and_eval_commands(quick_demo, tmp_path, capsys):
    loras = quick_demo / "loras" / "glance-10"
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
    assert [r["name"] for r in report["runs"]] == ["base-50", "glance-10", "base-10", "base-20"]
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
