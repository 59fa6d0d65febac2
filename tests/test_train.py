"""The phase trainer on a tiny random FLUX and a real photo (scikit-learn's china.jpg), end to end."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers import FluxTransformer2DModel as TorchFlux
from sklearn.datasets import load_sample_images

from glance_jax import data, families, lora, train_config, train_step
from glance_jax.checkpoints import safetensors_io
from glance_jax.cli import main
from glance_jax.models import FluxTransformer2DModel
from glance_jax.train import default_config, prepare, train, train_phases
from torch_peers import randomize_

CONFIG = dict(in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode_with_diffusers(folder, name, caption, resolution=256, seed=0):
    """Writes name.safetensors the way a user would with PyTorch tools: a (tiny, random) diffusers VAE
    encodes the resized photo; the text embeddings are random stand-ins for T5 and CLIP."""
    sample = [s for s in data.find_samples(folder, resolution) if s.caption == caption][0]
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    pixels = torch.from_numpy(data.load_image(sample)).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    latents = ((mean - vae.config.shift_factor) * vae.config.scaling_factor)[0].permute(1, 2, 0).numpy()
    rng = np.random.default_rng(seed)
    safetensors_io.save_file({"latents": latents, "prompt_embeds": rng.standard_normal((6, 24), dtype=np.float32),
                              "pooled_prompt_embeds": rng.standard_normal((20,), dtype=np.float32)},
                             os.path.join(folder, name + ".safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    randomize_(TorchFlux(**CONFIG), seed=0).save_pretrained(tmp / "base")
    sample = tmp / "sample"
    sample.mkdir()
    shutil.copy(load_sample_images().filenames[0], sample / "china.jpg")
    (sample / "china.txt").write_text("a chinese temple among green trees")
    encode_with_diffusers(sample, "china", "a chinese temple among green trees")
    return tmp


def tiny_config(setup, **overrides):
    c = default_config("flux", "slow")
    c.model.path, c.model.dtype = str(setup / "base"), "fp32"
    c.data.dir, c.data.resolution, c.data.cache_dir = str(setup / "sample"), 256, str(setup / "cache")
    c.lora.rank, c.lora.alpha = 4, 16.0
    c.optim.warmup_steps = 2
    c.steps, c.checkpoint.every = 12, 4
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_teacher_loss_is_zero_where_the_student_is_the_base():
    """loss_fn on its own: with the LoRA's B = 0 the student is the base, so on states that the base's own Euler
    step joins the teacher target's loss is 0; on a state off that step it is not (the check can fail)."""
    import jax.numpy as jnp
    model = FluxTransformer2DModel(**CONFIG, dtype=jnp.float32, param_dtype=jnp.float32)
    params = model.init_params(jax.random.PRNGKey(0))
    adapter = lora.init_lora(jax.random.PRNGKey(1), params, "flux", 4, 16.0)
    rng = np.random.default_rng(0)
    cond, static = model.conditioning({"prompt_embeds": rng.standard_normal((1, 6, 24), dtype=np.float32),
                                       "pooled_prompt_embeds": rng.standard_normal((1, 20), dtype=np.float32)}, 2, 2)
    batch = {"x0": jnp.zeros((1, 4, 64)), "cond": cond}
    sigmas = jnp.asarray([0.8, 0.5, 0.0])
    x = jnp.asarray(rng.standard_normal((1, 4, 64), dtype=np.float32))
    v = model.apply({"params": params}, hidden_states=x, timestep=jnp.full((1,), 0.8), **cond)
    settings = train_step.Settings(tuple(sorted(default_config("flux").optim.items())), "teacher", 0.0, 1, 1.0,
                                   False, False)
    texts = {"encoder_hidden_states": cond["encoder_hidden_states"][None],
             "pooled_projections": cond["pooled_projections"][None]}
    loss = lambda jump: train_step.loss_fn(model, static, settings, adapter, params, batch,
                                           {"sigmas": sigmas, "states": jnp.stack([x, jump, x])[None, :, 0],
                                            "texts": texts}, jnp.asarray([1.0, 0.0, 0.0]), jax.random.PRNGKey(2))
    value, timestep = loss(x - 0.3 * v)
    assert float(timestep) == pytest.approx(800) and float(value) < 1e-10
    assert float(loss(x - 0.2 * v)[0]) > 1e-3


def test_loss_falls_and_only_the_lora_changes(setup, tmp_path):
    config = tiny_config(setup, steps=30, **{"checkpoint.every": 30})
    run = prepare(config, tmp_path)
    base = jax.tree_util.tree_map(np.array, run.params)
    written = train_phases(run)
    losses = [m["loss"] for m in metrics(tmp_path)]
    print("loss curve:", " ".join(f"{x:.2f}" for x in losses))
    assert len(losses) == 30 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    jax.tree_util.tree_map(np.testing.assert_array_equal, run.params, base)
    record = metrics(tmp_path)[0]
    assert set(record) >= {"step", "loss", "lr", "timestep", "steps_per_sec"} and record["lr"] == 0.0
    assert {round(m["timestep"], 3) for m in metrics(tmp_path)} <= {round(t, 3) for t in run.schedule.slow}
    keys = safetensors_io.SafetensorsFile(written["slow"]).keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_exported_lora_loads_into_diffusers(setup, tmp_path):
    written = train(tiny_config(setup, steps=4), tmp_path)
    reference = TorchFlux.from_pretrained(setup / "base")
    reference.load_lora_adapter(str(tmp_path), weight_name="slow_lora.safetensors", prefix="transformer")
    config = reference.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (4, 4)  # the trained scale 16 / 4 is folded into lora_B
    _, params = FluxTransformer2DModel.from_pretrained(setup / "base")
    alpha = lora.load_lora(written["slow"], params)["transformer_blocks"]["attn"]["to_q"]["alpha"]
    assert set(np.asarray(alpha).tolist()) == {16.0}  # and the trained alpha comes back here
    assert any("lora_B" in n and float(p.detach().abs().max()) > 0 for n, p in reference.named_parameters())
    assert os.path.exists(written["slow"])


def test_both_phases_and_the_teacher_target(setup, tmp_path):
    config = tiny_config(setup, phase="both", target="teacher", steps=6, **{"teacher.trajectories": 2,
                                                                             "teacher.substeps": 10})
    config.data.cache_dir = str(tmp_path / "cache")
    assert not prepare(config, tmp_path).cache_hit
    run = prepare(config, tmp_path)
    assert run.cache_hit  # the encoded sample was cached by the first run: no encoder ran
    written = train_phases(run)
    assert set(written) == {"slow", "fast"}
    by_phase = {p: [m for m in metrics(tmp_path) if m["phase"] == p] for p in ("slow", "fast")}
    assert len(by_phase["slow"]) == len(by_phase["fast"]) == 6
    assert all(np.isfinite(m["loss"]) for m in metrics(tmp_path))
    assert {round(m["timestep"], 3) for m in by_phase["fast"]} <= {round(t, 3) for t in run.schedule.fast}


def run_cli(workdir, setup, *extra):
    return [sys.executable, "-m", "glance_jax.cli", "train", "--config", os.path.join(REPO, "configs/flux.py") + ":tiny",
            "--workdir", str(workdir), f"--config.model.path={setup / 'base'}", f"--config.data.dir={setup / 'sample'}",
            f"--config.data.cache_dir={setup / 'cache'}", "--config.phase=slow", "--config.steps=16", *extra]


def test_killed_run_resumes_to_the_same_lora(setup, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(run_cli(tmp_path / "whole", setup), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(run_cli(tmp_path / "killed", setup), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    path = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(run_cli(tmp_path / "killed", setup), check=True, capture_output=True, env=env)
    read = lambda d: {k: f.read(k) for f in [safetensors_io.SafetensorsFile(d / "slow_lora.safetensors")]
                      for k in f.keys()}
    whole, resumed = read(tmp_path / "whole"), read(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for k in whole:
        np.testing.assert_array_equal(whole[k], resumed[k])
    steps = [m["step"] for m in metrics(tmp_path / "killed")]
    assert steps == list(range(1, 17))  # no step logged twice after the resume


def test_a_non_finite_loss_stops_with_a_clear_message(setup, tmp_path, capsys):
    bad = tmp_path / "bad_sample"
    shutil.copytree(setup / "sample", bad)
    f = safetensors_io.SafetensorsFile(bad / "china.safetensors")
    arrays = {k: f.read(k) for k in f.keys()}
    arrays["latents"][0, 0, 0] = 3e38  # finite (a NaN encoding is refused when it is read), but no loss survives it
    safetensors_io.save_file(arrays, bad / "china.safetensors")
    code = main(["train", "--config", os.path.join(REPO, "configs/flux.py") + ":tiny", "--workdir", str(tmp_path / "w"),
                 f"--config.model.path={setup / 'base'}", f"--config.data.dir={bad}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and re.search("loss became (nan|inf) at step 1", err) and "last good checkpoint is none" in err


@pytest.mark.parametrize("problem,message", [
    ("no_caption", "no caption (china.txt is missing)"),
    ("empty_caption", "the caption is empty"),
    ("unreadable", "unreadable image"),
    ("small", "smaller than the training resolution 256"),
    ("empty", "no images"),
    ("no_encoding", "no encoded latents and text encodings"),
])
def test_bad_sample_folders(setup, tmp_path, capsys, problem, message):
    folder = tmp_path / "sample"
    shutil.copytree(setup / "sample", folder)
    if problem == "no_caption":
        os.remove(folder / "china.txt")
    elif problem == "empty_caption":
        (folder / "china.txt").write_text("  \n")
    elif problem == "unreadable":
        (folder / "china.jpg").write_bytes(b"not really a jpeg")
    elif problem == "small":
        from PIL import Image
        Image.open(folder / "china.jpg").resize((200, 133)).save(folder / "china.jpg")
    elif problem == "empty":
        for name in os.listdir(folder):
            os.remove(folder / name)
    elif problem == "no_encoding":
        os.remove(folder / "china.safetensors")
    code = main(["train", "--config", os.path.join(REPO, "configs/flux.py") + ":tiny", "--workdir", str(tmp_path / "w"),
                 f"--config.model.path={setup / 'base'}", f"--config.data.dir={folder}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("glance-jax train: error:") and message in err[0]


@pytest.mark.parametrize("args,message", [
    (["--config.optim.nonexistent=1"], "nonexistent"),
    (["--config.model.path="], "config.model.path is not set"),
    (["--config.target=magic"], "config.target 'magic'"),
])
def test_bad_flags(setup, tmp_path, capsys, args, message):
    code = main(["train", "--config", os.path.join(REPO, "configs/flux.py") + ":tiny", "--workdir", str(tmp_path),
                 f"--config.model.path={setup / 'base'}", f"--config.data.dir={setup / 'sample'}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and message in err[0], err


CONFIG_ARGS = {"flux.py": ("slow", "fast", "both", "teacher", "tiny"),
               "flux_kontext.py": ("slow", "fast", "both", "teacher", "tiny"),
               "qwen_image.py": ("slow", "fast", "both", "teacher", "teacher_onepass"),
               "qwen_image_edit.py": ("slow", "fast", "both", "teacher")}


def test_every_config_file_loads():
    """Every configs/FILE.py:ARG gives a config the trainer accepts; the official variants are the family's
    recipe (glance_jax.families), and an unknown ARG is refused."""
    import importlib.util
    assert sorted(os.listdir(os.path.join(REPO, "configs"))) == sorted(CONFIG_ARGS)
    for name, args in CONFIG_ARGS.items():
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert f"glance-jax train --config configs/{name}:slow" in module.__doc__
        for arg in args:
            config = module.get_config(arg)
            config.model.path, config.data.dir = "/base", "/sample"
            if families.get(config.family).reference_images:  # an edit: the source image's folder too
                config.data.sources = ("/source",)
            train_config.check(config)
            assert config.lora.alpha == 4 * config.lora.rank
            assert config.phase == (arg if arg in ("slow", "fast") else "both")
            recipe = families.get(config.family).recipe
            if arg in ("slow", "fast", "both"):
                assert (config.lora.rank, config.optim.lr, config.data.caption_dropout) == (
                    recipe.rank, recipe.lr, recipe.caption_dropout)
                assert config.target == "data" and config.lora.targets == config.family
            if arg.startswith("teacher"):
                assert config.target == "teacher" and config.lora.targets == config.family + "-all"
            # the Qwen-Image teacher recipe samples as the official pipeline: true CFG 5, two passes a step
            two_pass = {("qwen_image.py", "teacher"): 5.0, ("qwen_image_edit.py", "teacher"): 4.0}
            assert config.student.guidance_scale == two_pass.get((name, arg), 1.0)
        with pytest.raises(ValueError):
            module.get_config("medium")


def test_qwen_image_trains_with_caption_dropout(tmp_path):
    """Qwen-Image: masked text of any length, the empty prompt padded to it, caption dropout 0.5."""
    from diffusers import QwenImageTransformer2DModel as TorchQwen
    config_q = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=[4, 6, 6])
    randomize_(TorchQwen(**config_q), seed=0).save_pretrained(tmp_path / "base")
    sample = tmp_path / "sample"
    sample.mkdir()
    shutil.copy(load_sample_images().filenames[1], sample / "flower.jpg")
    (sample / "flower.txt").write_text("a pink flower")
    s = data.find_samples(sample, 256)[0]
    rng = np.random.default_rng(0)
    safetensors_io.save_file({
        "latents": rng.standard_normal((s.height // 8, s.width // 8, 16), dtype=np.float32),
        "prompt_embeds": rng.standard_normal((5, 24), dtype=np.float32), "prompt_embeds_mask": np.ones(5, np.int64),
        "empty_prompt_embeds": rng.standard_normal((2, 24), dtype=np.float32)}, sample / "flower.safetensors")
    c = default_config("qwen-image", "both")
    c.model.path, c.model.dtype = str(tmp_path / "base"), "fp32"
    c.data.dir, c.data.resolution, c.data.cache_dir = str(sample), 256, str(tmp_path / "cache")
    c.lora.rank, c.lora.alpha = 4, 16.0
    c.steps, c.checkpoint.every, c.data.caption_dropout = 8, 8, 0.5
    run = prepare(c, tmp_path / "run")
    assert run.batch["cond"]["encoder_hidden_states"].shape == (1, 5, 24) == run.batch["empty_cond"][
        "encoder_hidden_states"].shape
    assert run.schedule.slow_steps == (1, 3, 5, 7, 9)
    written = train_phases(run)
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 16 and all(np.isfinite(losses))
    keys = set(safetensors_io.SafetensorsFile(written["slow"]).keys())
    assert "transformer.transformer_blocks.1.img_mod.1.lora_A.weight" in keys  # the Qwen preset's twelve targets
    assert len(keys) == 2 * 12 * 2
