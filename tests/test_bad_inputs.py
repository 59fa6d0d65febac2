"""Every bad input a user can give, in one table: one line, a named cause, nothing written, no heavy work.

Each case is a working command with one value changed. The working command itself is checked to get
past every check and reach the expensive work (a model load, a compile), which is replaced here by a
function that raises `HeavyWork`: a bad input must be refused before that point, so no case ever
loads a model and the module runs in seconds. The real runs of these commands are tested in
test_train.py, test_demo.py, test_convert.py and test_lora.py. Further down: the Python API's checks,
the resume cases, the cache and the converter's leftovers.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from diffusers import AutoencoderKL as TorchVAE
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers import FluxTransformer2DModel as TorchFlux
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import CLIPTextModel as TorchCLIP
from transformers import T5EncoderModel as TorchT5

import glance_jax.plan
import glance_jax.sampling_cli
from glance_jax import checkpoints, data, families, lora
from glance_jax.checkpoints import safetensors_io
from glance_jax.cli import main
from glance_jax.demo import teacher
from glance_jax.errors import GlanceError
from glance_jax.train import default_config, prepare
from test_text import CLIP, T5, word_tokenizer
from torch_peers import randomize_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "flux.py") + ":tiny"
FLUX = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
CAPTION = "a photo of the red fox"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny FLUX.1 pipeline folder as diffusers writes it, a one-image sample, two LoRAs, a prompt file."""
    root = tmp_path_factory.mktemp("bad_inputs")
    vae = TorchVAE(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                        vae=randomize_(vae, 1), text_encoder=randomize_(TorchCLIP(CLIP), 2),
                        tokenizer=word_tokenizer(root / "tok1", ["<s>", "</s>"], "<s> $A </s>", 77),
                        text_encoder_2=randomize_(TorchT5(T5), 3),
                        tokenizer_2=word_tokenizer(root / "tok2", ["</s>"], "$A </s>", 16),
                        transformer=randomize_(TorchFlux(**FLUX), 0))
    pipe.save_pretrained(root / "pipe")
    sample = root / "sample"
    sample.mkdir()
    Image.open(load_sample_images().filenames[0]).resize((96, 64)).save(sample / "china.png")
    (sample / "china.txt").write_text(CAPTION)
    params = checkpoints.abstract_params(checkpoints.model_from_config(
        json.loads((root / "pipe" / "transformer" / "config.json").read_text()), np.float32, families.CLASSES))
    tree = lora.init_lora(jax.random.PRNGKey(0), params, "flux", 4, 16.0)
    tree = jax.tree_util.tree_map(lambda x: x + 0.01 if x.ndim > 1 else x, tree)
    for name in ("slow", "fast"):
        lora.save_lora(tree, root / f"{name}.safetensors")
    (root / "prompts.txt").write_text(CAPTION + "\n")
    (root / "a_file").write_text("not a folder")
    (root / "out").mkdir()
    return root


class HeavyWork(Exception):
    """Raised by the stand-ins for model loading and compiling: reaching one means every check passed."""


@pytest.fixture
def no_heavy_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise HeavyWork()
    for target, name in ((checkpoints, "load_model"), (checkpoints, "read_params"), (lora, "load_lora"),
                         (glance_jax.sampling_cli, "load_lora"), (glance_jax.plan, "plan"),
                         (glance_jax.plan.subprocess, "run"), (checkpoints, "convert_checkpoint"),
                         (teacher, "train_teacher")):
        monkeypatch.setattr(target, name, refuse)


def good(w, command):
    """The working command line of each subcommand: [positional, ...] and {flag: value}."""
    out = w / "out"
    return {
        "train": ([], {"--config": TINY, "--workdir": out / "run", "--config.model.path": w / "pipe",
                       "--config.data.dir": w / "sample", "--config.data.resolution": "64",
                       "--config.data.cache_dir": out / "cache", "--config.phase": "slow", "--config.steps": "4"}),
        "sample": ([], {"--model": w / "pipe", "--prompt": CAPTION, "--out": out / "fox.png", "--height": "64",
                        "--width": "64", "--slow_lora": w / "slow.safetensors", "--fast_lora": w / "fast.safetensors"}),
        "eval": ([], {"--model": w / "pipe", "--prompts": w / "prompts.txt", "--workdir": out / "eval",
                      "--base_steps": "4", "--height": "64", "--width": "64"}),
        "convert": ([w / "pipe", out / "converted"], {"--dtype": "fp32"}),
        "export-lora": ([w / "slow.safetensors", out / "kohya.safetensors"], {"--model": w / "pipe",
                                                                                 "--format": "kohya"}),
        "plan": ([], {"--model": "flux-dev", "--resolution": "256", "--remat": "full"}),
        "demo": ([], {"--quick": True, "--workdir": out / "demo"}),
    }[command]


def argv(w, command, changes):
    """The working command with `changes` ({flag or 0/1 for a positional: value, None drops it})."""
    positional, flags = good(w, command)
    positional, flags = list(positional), dict(flags)
    for key, value in changes.items():
        if isinstance(key, int):
            positional[key] = value
        elif value is None:
            flags.pop(key, None)
        else:
            flags[key] = value
    out = [command, *map(str, positional)]
    for flag, value in flags.items():
        out.append(flag if value is True else f"{flag}={value}")
    return out


# (command, changes, words the one line must contain, the destination that must stay as it was)
CASES = [
    # train: numbers
    ("train", {"--config.steps": "-5"}, "config.steps -5: must be a positive integer", "--workdir"),
    ("train", {"--config.steps": "0"}, "config.steps 0", "--workdir"),
    ("train", {"--config.lora.rank": "0"}, "config.lora.rank 0", "--workdir"),
    ("train", {"--config.lora.alpha": "-16"}, "config.lora.alpha -16.0", "--workdir"),
    ("train", {"--config.lora.alpha": "nan"}, "config.lora.alpha nan", "--workdir"),
    ("train", {"--config.optim.lr": "nan"}, "config.optim.lr nan: must be a finite number > 0", "--workdir"),
    ("train", {"--config.optim.lr": "0"}, "config.optim.lr 0.0", "--workdir"),
    ("train", {"--config.optim.lr": "-1e-4"}, "config.optim.lr -0.0001", "--workdir"),
    ("train", {"--config.optim.grad_clip": "inf"}, "config.optim.grad_clip inf", "--workdir"),
    ("train", {"--config.optim.warmup_steps": "-1"}, "config.optim.warmup_steps -1", "--workdir"),
    ("train", {"--config.seed": "-1"}, "config.seed -1: must be an integer in [0, 4294967295]", "--workdir"),
    ("train", {"--config.batch_size": "2"}, "batch_size", "--workdir"),  # no such field: one sample
    ("train", {"--config.checkpoint.every": "0"}, "config.checkpoint.every 0", "--workdir"),
    ("train", {"--config.data.caption_dropout": "1.5"}, "config.data.caption_dropout 1.5", "--workdir"),
    ("train", {"--config.data.resolution": "250"}, "config.data.resolution 250: must be a multiple of 32",
     "--workdir"),
    ("train", {"--config.data.multiple": "8"}, "config.data.multiple 8: must be a multiple of 16", "--workdir"),
    ("train", {"--config.schedule.base_steps": "5"}, "config.schedule.slow_steps (1, 3, 5, 7, 9)", "--workdir"),
    # train: names
    ("train", {"--config.model.remat_policy": "sometimes"}, "config.model.remat_policy 'sometimes'", "--workdir"),
    ("train", {"--config.target": "magic"}, "config.target 'magic'", "--workdir"),
    ("train", {"--config.family": "sdxl"}, "config.family 'sdxl'", "--workdir"),
    ("train", {"--config.phase": "medium"}, "config.phase 'medium'", "--workdir"),
    ("train", {"--config.model.dtype": "fp8"}, "config.model.dtype 'fp8'", "--workdir"),
    ("train", {"--config.mesh": "pipeline=2"}, "mesh 'pipeline=2'", "--workdir"),
    ("train", {"--config.optim.nonexistent": "1"}, "nonexistent", "--workdir"),
    ("train", {"--config": "configs/missing.py"}, "missing.py", "--workdir"),
    ("train", {"--workdir": None}, "--config and --workdir are required", "--workdir"),
    # train: paths and kinds of model
    ("train", {"--config.model.path": ""}, "config.model.path is not set", "--workdir"),
    ("train", {"--config.model.path": "{w}/nowhere"}, "nowhere: no such file or folder", "--workdir"),
    ("train", {"--config.model.path": "{w}/pipe/vae"}, "holds AutoencoderKL, not FluxTransformer2DModel",
     "--workdir"),
    ("train", {"--config.family": "qwen-image"}, "holds FluxTransformer2DModel, not QwenImageTransformer2DModel",
     "--workdir"),
    ("train", {"--config.model.vae_path": "{w}/pipe/transformer"},
     "holds FluxTransformer2DModel, not AutoencoderKL or AutoencoderKLQwenImage", "--workdir"),
    ("train", {"--config.model.text_encoder_path": "{w}/pipe/vae"}, "no text_encoder/ in it", "--workdir"),
    ("train", {"--config.data.dir": "{w}/nowhere"}, "no such folder (config.data.dir)", "--workdir"),
    ("train", {"--workdir": "{w}/a_file"}, "is a file, not a folder", "--workdir"),
    ("train", {"--workdir": "/sys/glance_run"}, "cannot write in /sys", "--workdir"),
    # sample
    ("sample", {"--steps": "-3"}, "--steps -3: must be a positive integer", "--out"),
    ("sample", {"--steps": "0"}, "--steps 0", "--out"),
    ("sample", {"--steps": "4"}, "Glance LoRAs need the Glance schedule", "--out"),
    ("sample", {"--out": "{w}/out/fox.txt"}, "extension '.txt' does not match", "--out"),
    ("sample", {"--out": "{w}/out/fox"}, "extension '(none)'", "--out"),
    ("sample", {"--out": "{w}/prompts.txt"}, "extension '.txt'", "--out"),
    ("sample", {"--out": "{w}/slow.safetensors"}, "already exists (pass --overwrite", "--out"),
    ("sample", {"--out": "{w}/missing/fox.png"}, "the folder {w}/missing does not exist", "--out"),
    ("sample", {"--out": "{w}/a_file/fox.png"}, "a_file is a file, not a folder", "--out"),
    ("sample", {"--out": "/sys/fox.png"}, "cannot write in /sys", "--out"),
    ("sample", {"--height": "100"}, "--height 100: must be a multiple of 16", "--out"),
    ("sample", {"--width": "-64"}, "--width -64", "--out"),
    ("sample", {"--slow_lora": "{w}/missing.safetensors"}, "--slow_lora {w}/missing.safetensors: no such file",
     "--out"),
    ("sample", {"--model": "{w}/pipe/vae"}, "holds AutoencoderKL, not FluxTransformer2DModel", "--out"),
    ("sample", {"--model": "{w}/nowhere"}, "nowhere: no such file or folder", "--out"),
    ("sample", {"--vae": "{w}/pipe/transformer"}, "holds FluxTransformer2DModel, not AutoencoderKL", "--out"),
    ("sample", {"--schedule": "1,2"}, "--schedule '1,2'", "--out"),
    ("sample", {"--schedule": "0|5"}, "--schedule '0|5'", "--out"),
    ("sample", {"--integration": "fastest"}, "argument --integration: invalid choice: 'fastest'", "--out"),
    ("sample", {"--prompt": None}, "the following arguments are required: --prompt", "--out"),
    # eval
    ("eval", {"--base_steps": "0"}, "--base_steps 0", "--workdir"),
    ("eval", {"--seeds": "a,b"}, "--seeds 'a,b'", "--workdir"),
    ("eval", {"--prompts": "{w}/nowhere.txt"}, "no such prompt file", "--workdir"),
    ("eval", {"--workdir": "{w}/a_file"}, "is a file, not a folder", "--workdir"),
    ("eval", {"--workdir": "/sys/eval"}, "cannot write in /sys", "--workdir"),
    ("eval", {"--workdir": "{w}/done"}, "already holds eval.json (pass --overwrite", "--workdir"),
    ("eval", {"--height": "8"}, "--height 8: must be a multiple of 16", "--workdir"),
    # convert
    ("convert", {1: "{w}/pipe"}, "already exists (pass --overwrite", 1),
    ("convert", {1: "{w}/missing/flax"}, "the folder {w}/missing does not exist", 1),
    ("convert", {1: "/sys/flax"}, "cannot write in /sys", 1),
    ("convert", {1: "{w}/a_file", "--overwrite": True}, "a_file is a file; the output is a folder", 1),
    ("convert", {0: "{w}/nowhere"}, "nowhere: no such file or folder", 1),
    ("convert", {"--dtype": "fp8"}, "argument --dtype: invalid choice: 'fp8'", 1),
    ("convert", {"--axes_dims_rope": "a,b"}, "--axes_dims_rope 'a,b'", 1),
    # export-lora
    ("export-lora", {1: "{w}/fast.safetensors"}, "already exists (pass --overwrite", 1),
    ("export-lora", {1: "{w}/missing/k.safetensors"}, "the folder {w}/missing does not exist", 1),
    ("export-lora", {1: "{w}/out"}, "is a folder; give a file name", 1),
    ("export-lora", {1: "{w}/out/k.txt"}, "name it *.safetensors", 1),
    ("export-lora", {0: "{w}/nowhere.safetensors"}, "nowhere.safetensors: no such file or folder", 1),
    ("export-lora", {"--format": "comfy"}, "argument --format: invalid choice: 'comfy'", 1),
    # plan
    ("plan", {"--resolution": "-64"}, "--resolution -64: must be a positive integer", None),
    ("plan", {"--resolution": "100"}, "--resolution 100: must be a multiple of 16", None),
    ("plan", {"--remat": "sometimes"}, "--remat 'sometimes'", None),
    ("plan", {"--peak_tflops": "0"}, "--peak_tflops 0.0", None),
    ("plan", {"--glance_steps": "0"}, "--glance_steps 0", None),
    ("plan", {"--target_seconds": "-1"}, "--target_seconds -1.0", None),
    ("plan", {"--mesh": "fsdp=0"}, "mesh 'fsdp=0'", None),
    ("plan", {"--model": "sdxl"}, "argument --model: invalid choice: 'sdxl'", None),
    # demo
    ("demo", {"--workdir": "{w}/a_file"}, "is a file, not a folder", "--workdir"),
    ("demo", {"--workdir": "{w}/done"}, "already holds metrics.json (pass --overwrite", "--workdir"),
    ("demo", {"--no-such-flag": True}, "unrecognized arguments: --no-such-flag", "--workdir"),
]


def _snapshot(path):
    """What is at `path`: None, a file's bytes, or a folder's sorted listing with sizes."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return open(path, "rb").read()
    return sorted((os.path.relpath(os.path.join(r, n), path), os.path.getsize(os.path.join(r, n)))
                  for r, _, names in os.walk(path) for n in names)


def _fill(w, changes):
    return {k: (v.format(w=w) if isinstance(v, str) else v) for k, v in changes.items()}


@pytest.fixture(scope="module")
def done_folder(world):
    """A folder that already holds a finished eval and demo."""
    done = world / "done"
    done.mkdir(exist_ok=True)
    for name in ("eval.json", "metrics.json"):
        (done / name).write_text("{}")
    return done


@pytest.mark.parametrize("command", ["train", "sample", "eval", "convert", "export-lora", "plan", "demo"])
def test_the_working_commands_pass_every_check(world, no_heavy_work, command):
    """The commands the cases change get past every check, to the model load or compile."""
    with pytest.raises(HeavyWork):
        main(argv(world, command, {}))


@pytest.mark.parametrize("command,changes", [
    ("train", {"--config.model.path": "{w}/pipe/transformer", "--config.model.vae_path": "{w}/pipe",
               "--config.model.text_encoder_path": "{w}/pipe"}),
    ("train", {"--config.model.vae_path": "{w}/pipe/vae"}),
    ("sample", {"--model": "{w}/pipe/transformer", "--vae": "{w}/pipe", "--text_encoders": "{w}/pipe"}),
])
def test_a_pipeline_folder_stands_for_its_parts(world, no_heavy_work, command, changes):
    """A pipeline folder given where a VAE is wanted means its vae/ (it used to load the transformer as a VAE)."""
    with pytest.raises(HeavyWork):
        main(argv(world, command, _fill(world, changes)))


def test_python_loaders_take_a_pipeline_folder(world):
    from glance_jax.models import AutoencoderKL, FluxTransformer2DModel
    from glance_jax.models import T5EncoderModel
    for cls, part in ((FluxTransformer2DModel, "transformer"), (AutoencoderKL, "vae"),
                      (T5EncoderModel, "text_encoder_2")):
        _, params = cls.from_pretrained(world / "pipe")
        _, want = cls.from_pretrained(world / "pipe" / part)
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)


@pytest.mark.parametrize("command,changes,message,destination", CASES,
                         ids=[f"{c}-{'-'.join(f'{k}={v}' for k, v in ch.items())}" for c, ch, _, _ in CASES])
def test_bad_input_is_one_line_before_any_work(world, done_folder, no_heavy_work, capsys, command, changes,
                                               message, destination):
    changes = _fill(world, changes)
    args = argv(world, command, changes)
    if isinstance(destination, int):
        dest = args[1 + destination]
    elif destination is not None:
        dest = next((a.split("=", 1)[1] for a in args if a.startswith(destination + "=")), None)
    else:
        dest = None
    before = _snapshot(dest)
    code = main(args)  # a HeavyWork exception here: the check came after the expensive work
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2), err
    assert len(err) == 1 and err[0].startswith(f"glance-jax {command}: error: "), err
    assert message.format(w=world) in err[0], err
    assert "Traceback" not in err[0]
    assert _snapshot(dest) == before, f"{dest} changed"


# ---- the Python API ----

@pytest.fixture(scope="module")
def tiny_model(world):
    return families.load_model(world / "pipe" / "transformer")


@pytest.mark.parametrize("rank,alpha,message", [(0, 16.0, "rank 0"), (-2, 16.0, "rank -2"), (2.5, 16.0, "rank 2.5"),
                                                (4, 0.0, "alpha 0.0"), (4, float("nan"), "alpha nan"),
                                                (4, float("inf"), "alpha inf")])
def test_init_lora_refuses_bad_rank_and_alpha(tiny_model, rank, alpha, message):
    with pytest.raises(GlanceError, match=message):
        lora.init_lora(jax.random.PRNGKey(0), tiny_model[1], "flux", rank, alpha)


def test_merge_lora_names_the_layer_and_both_shapes(tiny_model):
    _, params = tiny_model
    tree = lora.init_lora(jax.random.PRNGKey(0), params, "flux", 4, 16.0)
    tree["transformer_blocks"]["attn"]["to_q"]["A"] = np.zeros((1, 40, 4), np.float32)
    message = (r"LoRA layer transformer_blocks\.attn\.to_q: A \(1, 40, 4\) and B \(1, 4, 32\) \(alpha \(1,\)\) do "
               r"not fit the model's kernel \(1, 32, 32\)")
    with pytest.raises(GlanceError, match=message):
        lora.merge_lora(params, tree, donate=False)
    with pytest.raises(GlanceError, match=message):  # donating: refused before the buffers are given away
        lora.merge_lora(params, tree)
    jax.tree_util.tree_map(np.asarray, params)  # still usable


def test_merge_lora_refuses_a_non_finite_scale(tiny_model):
    _, params = tiny_model
    tree = lora.init_lora(jax.random.PRNGKey(0), params, "flux", 4, 16.0)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(GlanceError, match=f"LoRA scale {scale}"):
            lora.merge_lora(params, tree, scale=scale)
    jax.tree_util.tree_map(np.asarray, params)


@pytest.mark.parametrize("lora_mode", ["merge", "unmerged"])
def test_pipeline_names_a_misfit_lora_in_both_modes(world, lora_mode):
    from glance_jax.pipelines import FluxGlancePipeline
    from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
    from glance_jax.schedules import GlanceSchedule
    model, params = families.load_model(world / "pipe" / "transformer")
    tree = lora.init_lora(jax.random.PRNGKey(0), params, "flux", 4, 16.0)
    tree["single_transformer_blocks"]["attn"]["to_k"]["B"] = np.zeros((1, 4, 48), np.float32)
    pipe = FluxGlancePipeline(model, params, FLUX_SCHEDULER)
    with pytest.raises(GlanceError, match=r"LoRA layer single_transformer_blocks\.attn\.to_k: A \(1, 32, 4\) and "
                                          r"B \(1, 4, 48\)"):
        pipe(np.zeros((1, 16, 32), np.float32), np.zeros((1, 32), np.float32), height=64, width=64,
             schedule=GlanceSchedule.official(FLUX_SCHEDULER, 16), slow_lora=tree, lora_mode=lora_mode)


# ---- the user's path: a pipeline folder alone ----

def test_a_pipeline_folder_alone_trains_and_samples(world, capsys):
    """`--config.model.path=PIPELINE` finds the VAE and text encoders beside the transformer; `sample --model
    PIPELINE` its scheduler, VAE and text encoders, and writes a real JPEG."""
    out = world / "out" / "alone"
    code = main(argv(world, "train", {"--workdir": out / "run", "--config.data.cache_dir": out / "cache"}))
    assert code == 0, capsys.readouterr().err
    written = out / "run" / "slow_lora.safetensors"
    assert any(k.endswith("lora_B.weight") for k in safetensors_io.SafetensorsFile(written).keys())
    code = main(argv(world, "sample", {"--out": out / "fox.jpg", "--slow_lora": written, "--fast_lora": written}))
    assert code == 0, capsys.readouterr().err
    with Image.open(out / "fox.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 64)


# ---- a resume that cannot lie ----

@pytest.fixture(scope="module")
def resume(world):
    """A sample with precomputed encodings (no encoders to compile) and an uninterrupted reference run."""
    folder = world / "resume_sample"
    shutil.copytree(world / "sample", folder)
    s = data.find_samples(folder, 64)[0]
    rng = np.random.default_rng(0)
    safetensors_io.save_file({"latents": rng.standard_normal((s.height // 8, s.width // 8, 16), dtype=np.float32),
                              "prompt_embeds": rng.standard_normal((5, 32), dtype=np.float32),
                              "pooled_prompt_embeds": rng.standard_normal((32,), dtype=np.float32)},
                             folder / "china.safetensors")
    assert main(resume_argv(world, world / "resume" / "whole")) == 0
    return world / "resume" / "whole"


def resume_argv(w, workdir, *extra):
    return argv(w, "train", {"--workdir": workdir, "--config.model.path": w / "pipe" / "transformer",
                             "--config.data.dir": w / "resume_sample", "--config.data.cache_dir": w / "resume_cache",
                             "--config.checkpoint.every": "2"}) + list(extra)


def lora_tensors(workdir):
    f = safetensors_io.SafetensorsFile(os.path.join(workdir, "slow_lora.safetensors"))
    return {k: f.read(k) for k in f.keys()}


def assert_same_lora(a, b):
    a, b = lora_tensors(a), lora_tensors(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_a_crash_between_the_last_checkpoint_and_the_lora_write(world, resume, monkeypatch, capsys):
    workdir = world / "resume" / "crash"
    real = lora.save_lora

    def killed_before_the_final_write(tree, path, *args, **kwargs):
        if os.path.basename(path) == "slow_lora.safetensors":
            raise KeyboardInterrupt  # stands in for a kill right after the last checkpoint committed
        return real(tree, path, *args, **kwargs)
    monkeypatch.setattr(lora, "save_lora", killed_before_the_final_write)
    assert main(resume_argv(world, workdir)) == 130
    assert (workdir / "checkpoints" / "slow" / "4").is_dir()  # the last checkpoint is committed ...
    assert not (workdir / "slow_lora.safetensors").exists()  # ... and no unfinished LoRA sits at the final path
    assert (workdir / "checkpoints" / "slow_lora_step2.safetensors").exists()  # the step-2 LoRA, named so
    monkeypatch.undo()
    assert main(resume_argv(world, workdir)) == 0
    assert_same_lora(workdir, resume)


@pytest.mark.parametrize("change,named", [
    ("--config.optim.lr=1e-4", "config.optim.lr 0.0005 -> 0.0001"),
    ("--config.lora.rank=8", "config.lora.rank 4 -> 8"),
    ("--config.data.resolution=96", "config.data.resolution 64 -> 96"),
    ("--config.seed=1", "config.seed 0 -> 1"),
])
def test_a_restart_with_other_settings_is_refused(world, resume, no_heavy_work, capsys, change, named):
    before = _snapshot(resume)
    assert main(resume_argv(world, resume, change)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "pass --fresh to start anew there, or use another --workdir" in err[0]
    assert _snapshot(resume) == before


def test_a_restart_with_another_sample_or_base_is_refused(world, resume, no_heavy_work, capsys, tmp_path):
    sample = tmp_path / "sample"
    shutil.copytree(world / "resume_sample", sample)
    (sample / "china.txt").write_text("a photo of the red cat")
    base = tmp_path / "base"
    shutil.copytree(world / "pipe" / "transformer", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config, indent=1))  # the same model, written otherwise
    for change, named in ((f"--config.data.dir={sample}", "the sample (image, caption or encodings) changed"),
                          (f"--config.model.path={base}", "the base model changed")):
        assert main(resume_argv(world, resume, change)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err


def test_a_longer_run_extends_a_shorter_one_and_a_shorter_is_refused(world, resume, no_heavy_work, monkeypatch,
                                                                      capsys):
    workdir = world / "resume" / "longer"
    shutil.copytree(resume, workdir)
    before = _snapshot(workdir)
    assert main(resume_argv(world, workdir, "--config.steps=2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has a checkpoint at step 4, beyond config.steps=2: pass --fresh" in err[0], err
    assert _snapshot(workdir) == before
    monkeypatch.undo()
    shutil.rmtree(workdir)
    assert main(resume_argv(world, workdir, "--config.steps=2")) == 0
    assert main(resume_argv(world, workdir)) == 0  # 2 more steps: the same LoRA as 4 steps at once
    assert_same_lora(workdir, resume)
    assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_fresh_starts_anew(world, resume, capsys):
    workdir = world / "resume" / "fresh"
    shutil.copytree(resume, workdir)
    (workdir / "my_lora.safetensors").write_bytes(b"the user's own file")  # named like the trainer's
    assert main(resume_argv(world, workdir, "--config.optim.lr=1e-4", "--fresh")) == 0
    lrs = [json.loads(line)["lr"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 4 and lrs[-1] == pytest.approx(1e-4)
    assert (workdir / "my_lora.safetensors").read_bytes() == b"the user's own file"
    assert not (workdir / "train.lock").exists()  # released when the run ended
    assert main(resume_argv(world, workdir, "--config.optim.lr=1e-4")) == 0  # and resumes that run from then on


def test_a_workdir_in_use_refuses_a_second_train_and_fresh(world, resume, no_heavy_work, capsys):
    workdir = world / "resume" / "in_use"
    shutil.copytree(resume, workdir)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / "train.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        before = _snapshot(workdir)
        for extra in ((), ("--fresh",)):
            code = main(resume_argv(world, workdir, *extra))
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 1 and len(err) == 1 and f"is in use by process {holder.pid} on" in err[0], err
            assert _snapshot(workdir) == before  # --fresh deleted nothing of the running run
    finally:
        holder.kill()
        holder.wait()


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(world, resume, capsys):
    workdir = world / "resume" / "corrupt"
    shutil.copytree(resume, workdir)
    damaged = 0
    for root, _, names in os.walk(workdir / "checkpoints" / "slow" / "4"):
        for name in names:
            if os.sep + "d" in root:  # the data files of the arrays
                path = os.path.join(root, name)
                size = os.path.getsize(path)
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                damaged += 1
    assert damaged
    (workdir / "slow_lora.safetensors").unlink()
    assert main(resume_argv(world, workdir)) == 0
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "falling back to the one before" in err
    assert (workdir / "checkpoints" / "slow.corrupt-step4").is_dir()
    assert_same_lora(workdir, resume)  # resumed from step 2: the same LoRA as the uninterrupted run


def test_a_corrupt_cache_entry_is_recomputed(world, resume):
    cache = world / "resume_cache"
    entries = [p for p in os.listdir(cache) if p.endswith(".safetensors")]
    assert len(entries) == 1
    path = cache / entries[0]
    f = safetensors_io.SafetensorsFile(path)
    good_arrays = {k: f.read(k) for k in f.keys()}
    blob = bytearray(path.read_bytes())
    blob[-4:] = b"\xff\xff\xff\x7f"  # a NaN in the last array: the header still reads, the checksum does not
    path.write_bytes(bytes(blob))
    config = default_config("flux", "slow")
    config.model.path, config.model.dtype = str(world / "pipe" / "transformer"), "fp32"
    config.data.dir, config.data.resolution, config.data.cache_dir = str(world / "resume_sample"), 64, str(cache)
    config.lora.rank, config.lora.alpha = 4, 16.0
    run = prepare(config, world / "resume" / "cache_run")
    assert not run.cache_hit
    f = safetensors_io.SafetensorsFile(path)
    for k in good_arrays:
        np.testing.assert_array_equal(f.read(k), good_arrays[k])
    assert prepare(config, world / "resume" / "cache_run").cache_hit


# ---- the converter's leftovers ----

def test_convert_removes_leftovers_of_killed_conversions(world, capsys):
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()
    dst = world / "out" / "converted_again"
    stale = world / "out" / f"converted_again.partial-{gone.pid}"
    (stale / "params").mkdir(parents=True)
    live = world / "out" / f"converted_again.partial-{os.getppid()}"  # a conversion still running: left alone
    live.mkdir()
    assert main(["convert", str(world / "pipe"), str(dst), "--dtype", "fp32"]) == 0
    assert dst.is_dir() and not stale.exists() and live.exists()
    shutil.rmtree(live)


def test_sigterm_removes_the_scratch_folder_at_once(world, monkeypatch, capsys):
    dst = world / "out" / "terminated"

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the conversion")
    monkeypatch.setattr(checkpoints, "read_params", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["convert", str(world / "pipe"), str(dst), "--dtype", "fp32"]) == 130
    assert signal.getsignal(signal.SIGTERM) == previous
    assert not dst.exists() and not list((world / "out").glob("terminated.partial-*"))
