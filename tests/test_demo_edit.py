"""The embedded edit demo: its committed Kontext-architecture teacher, and `glance-jax demo --edit --quick` end to end."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers import FluxTransformer2DModel as TorchFlux

from glance_jax import lora
from glance_jax.cli import main
from glance_jax.demo import edit, edit_teacher
from glance_jax.models import FluxTransformer2DModel
from torch_peers import relative_error

METHODS = ["teacher-50", "base-uniform-30", "base-uniform-20", "base-uniform-10", "base-uniform-6", "base-uniform-4", "base-uniform-3", "base-fitted-6",
           "base-fitted-4", "glance-10", "glance-6", "glance-4", "glance-3", "glance-official-10", "glance-data-10"]
# The committed teacher's edit accuracy: its 50-step edits of the quick demo's held-out sources (digits it never
# saw) against the exact edits, in dB (PSNR, [-1, 1] images). A teacher trained 200 steps scores about 8 dB; another
# edit than the one asked is at most EXACT_DB - 6 away (test_the_edit_matters); the committed one scores 28.9 dB
# (seed 0; its worst edit, invert, 21.4).
EXACT_DB = 24.0


def test_instruction_sets_are_apart_and_each_has_an_unseen_paraphrase():
    reported, validated = edit.instructions(False), edit.instructions(True)
    assert not {t for t, _ in reported} & {t for t, _ in validated}
    for chosen in (reported, validated):
        assert edit.TRAIN_INSTRUCTION not in {t for t, _ in chosen}
        assert {edit_teacher.edit_of(t) for t, k in chosen if k == "unseen"} == set(edit_teacher.NAMES)
        for t, kind in chosen:
            name = edit_teacher.edit_of(t)
            assert t in (edit_teacher.trained_phrasings(name) if kind == "trained" else
                         edit_teacher.unseen_phrasings(name))
    prompts = edit_teacher.load_prompts()
    assert set(edit_teacher.all_instructions()) <= set(prompts)
    assert prompts[""][0].shape == (edit_teacher.TEXT_TOKENS, 384)


def test_held_out_sources_are_unseen_and_the_edits_exact():
    train_images, held_out, _ = edit_teacher.split()
    for validation in (False, True):
        images, labels = edit.sources(validation, 10)
        assert list(labels) == list(range(10))
        assert not any(np.array_equal(image, seen) for image in images for seen in train_images[:200])
    images = held_out[:3]
    assert np.array_equal(edit_teacher.apply_edit("mirror", images), images[:, :, ::-1])
    assert np.array_equal(edit_teacher.apply_edit("invert", images), -images)
    rotated = edit_teacher.apply_edit("quarter-turn", images)
    assert np.array_equal(edit_teacher.apply_edit("quarter-turn", edit_teacher.apply_edit("quarter-turn", rotated)),
                          edit_teacher.apply_edit("quarter-turn", edit_teacher.apply_edit("upside-down", images[:, :, ::-1])))
    shifted = edit_teacher.apply_edit("shift", images)
    assert np.all(shifted[:, :, 0] == -1) and np.array_equal(shifted[:, :, 1:], images[:, :, :-1])


def _kontext_inputs(model, seed=0, batch=2):
    """Our model's keyword inputs (reference tokens appended) and diffusers' (FluxKontextPipeline concatenates the
    reference's packed tokens to hidden_states and their ids to img_ids, and cuts the output back)."""
    rng = np.random.default_rng(seed)
    prompts = edit_teacher.load_prompts()
    texts = ["turn it upside down", "make a negative of it"][:batch]
    encodings = {"prompt_embeds": np.stack([prompts[t][0] for t in texts]),
                 "pooled_prompt_embeds": np.stack([prompts[t][1] for t in texts]),
                 "image_latents": (edit_teacher.split()[1][:batch],)}
    cond, _ = edit_teacher.FAMILY.conditioning(model, encodings, 4, 4)
    x = rng.standard_normal((batch, 16, 4)).astype(np.float32)
    t = rng.uniform(0.05, 1.0, (batch,)).astype(np.float32)
    ours = dict(hidden_states=x, timestep=t, **cond)
    theirs = dict(hidden_states=np.concatenate([x, np.asarray(cond["reference_hidden_states"])], axis=1),
                  timestep=t, encoder_hidden_states=encodings["prompt_embeds"],
                  pooled_projections=encodings["pooled_prompt_embeds"], img_ids=np.asarray(cond["img_ids"]),
                  txt_ids=np.asarray(cond["txt_ids"]))
    return ours, theirs


def _torch_forward(transformer, inputs):
    with torch.no_grad():
        out = transformer(**{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}, return_dict=False)[0].numpy()
    return out[:, :16]  # the image's tokens: the reference's are cut off, as FluxKontextPipeline does


def test_committed_edit_teacher_is_a_diffusers_kontext_transformer():
    folder = edit_teacher.TEACHER_DIR
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) <= 20 * 2 ** 20
    reference = TorchFlux.from_pretrained(folder).eval()
    model, params = FluxTransformer2DModel.from_pretrained(folder)
    ours, theirs = _kontext_inputs(model)
    got = np.asarray(model.apply({"params": params}, **ours))
    assert relative_error(got, _torch_forward(reference, theirs)) < 1e-4


@pytest.fixture(scope="module")
def quick_edit_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("edit_demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--edit", "--quick", "--workdir", str(workdir)]) == 0
    return workdir, printed.getvalue()


def test_quick_edit_demo_writes_the_table_and_the_grid(quick_edit_demo):
    workdir, printed = quick_edit_demo
    report = json.loads((workdir / "metrics.json").read_text())
    assert [m["name"] for m in report["methods"]] == METHODS
    by_name = {m["name"]: m for m in report["methods"]}
    for m in report["methods"]:
        assert set(m) >= {"name", "steps", "nfe", "sec_per_image", "psnr_vs_teacher", "psnr_train_edit",
                          "psnr_vs_truth", "psnr_train_edit_vs_truth", "psnr_vs_truth_by_edit", "mse_vs_teacher",
                          "kind", "schedule", "target", "guidance", "reference"}
        assert all(np.isfinite(m[k]) for k in ("nfe", "psnr_vs_teacher", "psnr_train_edit", "psnr_vs_truth"))
        assert m["reference"] == "teacher-50" and m["guidance"] == 1.0
        assert (m["kind"] == "glance") == m["name"].startswith("glance-")
        assert m["target"] == (None if m["kind"] == "base" else "data" if m["name"] == "glance-data-10" else "teacher")
        assert m["nfe"] == int(m["name"].split("-")[-1])  # one pass a step
        assert set(m["psnr_vs_truth_by_edit"]) == set(edit_teacher.NAMES)
        if m["kind"] == "glance":
            assert m["speedup"] == pytest.approx(m["equivalent_base_nfe"] / m["nfe"])
        else:
            assert "speedup" not in m
    assert by_name["teacher-50"]["mse_vs_teacher"] == 0
    assert by_name["glance-official-10"]["schedule"] == "official" and by_name["base-fitted-4"]["schedule"] == "fitted"
    assert report["images_per_method"] == len(report["instructions"]) * 5
    assert (workdir / "grid.png").is_file()
    lines = printed.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("method"))) + 1:]
    for name, line in zip(METHODS, table):
        assert line.split()[0] == name
    assert any(l.startswith("edit: ") for l in lines) and "teacher-50 edit accuracy by edit" in printed


def test_the_committed_teacher_performs_its_edits(quick_edit_demo):
    """teacher-50's edits of held-out sources (digits the teacher never saw) against the exact edits."""
    report = json.loads((quick_edit_demo[0] / "metrics.json").read_text())
    teacher = next(m for m in report["methods"] if m["name"] == "teacher-50")
    print("teacher-50 vs the exact edits:", teacher["psnr_vs_truth"], teacher["psnr_vs_truth_by_edit"])
    assert teacher["psnr_vs_truth"] >= EXACT_DB
    assert min(teacher["psnr_vs_truth_by_edit"].values()) >= EXACT_DB - 4


def test_the_edit_matters():
    """The same sources edited as asked agree with the exact edit far better than with another edit's."""
    _, images, _ = edit_teacher.split()
    edits = {name: edit_teacher.apply_edit(name, images) for name in edit_teacher.NAMES}
    from glance_jax import evaluation
    crossed = [evaluation.psnr(edits[a], edits[b]) for a in edits for b in edits if a != b]
    assert max(crossed) < EXACT_DB - 6


def test_an_edit_lora_loads_into_diffusers_kontext(quick_edit_demo):
    """The glance-4 Slow-LoRA the demo wrote, in diffusers' FluxKontextPipeline over the committed teacher
    (load_lora_weights): its transformer gives what ours gives with the LoRA merged."""
    workdir = quick_edit_demo[0]
    run = workdir / "loras" / "glance-4"
    model, params = FluxTransformer2DModel.from_pretrained(edit_teacher.TEACHER_DIR)
    tree = lora.load_lora(str(run / "slow_lora.safetensors"), params)
    ours, theirs = _kontext_inputs(model, seed=1)
    got = np.asarray(model.apply({"params": lora.merged_params(params, tree)}, **ours))
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(edit_teacher.SCHEDULER),
                               vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                               transformer=TorchFlux.from_pretrained(edit_teacher.TEACHER_DIR).eval())
    without = _torch_forward(pipe.transformer, theirs)
    pipe.load_lora_weights(str(run), weight_name="slow_lora.safetensors")
    want = _torch_forward(pipe.transformer, theirs)
    err = relative_error(got, want)
    print(f"edit demo Slow-LoRA in diffusers' FluxKontextPipeline vs here: {err:.2e}")
    assert err < 1e-4 and relative_error(without, want) > 1e-3  # the LoRA loaded, and it matters


def test_edit_demo_refuses_all(tmp_path, capsys):
    from glance_jax.cli import main
    assert main(["demo", "--edit", "--all", "--workdir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--all adds the guided text-to-image rows" in err[0]
    assert not (tmp_path / "d").exists()


def test_every_demo_asset_is_package_data():
    """A fresh install (`pip install .`) carries every committed demo asset: setup.cfg's package_data covers it."""
    import configparser
    import fnmatch
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["glance_jax"].split(",")]
    assets = root / "glance_jax" / "demo" / "assets"
    files = [p.relative_to(root / "glance_jax").as_posix() for p in assets.rglob("*") if p.is_file()]
    matches = lambda f, p: len(f.split("/")) == len(p.split("/")) and all(  # a * stops at "/", as in setuptools
        fnmatch.fnmatch(a, b) for a, b in zip(f.split("/"), p.split("/")))
    missing = [f for f in files if not any(matches(f, p) for p in patterns)]
    assert files and not missing, missing
