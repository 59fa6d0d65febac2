"""Hub ids where a model folder is accepted, from a local hub cache (no network: HF_HUB_OFFLINE=1).

The cache is laid out as huggingface_hub writes one (HF_HOME/hub/models--<owner>--<name>/refs/main and
snapshots/<commit>/) and holds tiny pipelines laid out as the FLUX.1-dev and Qwen-Image repositories are:
model_index.json, scheduler/scheduler_config.json, transformer/ and the T5 / Qwen2.5-VL text encoder sharded
with their index files, vae/, and the tokenizer folders with the real tokenizers under the repositories' file
names (tests/real_tokenizers.py; left out: FLUX.1's SentencePiece spiece.model and Qwen's chat_template.jinja,
which prompt encoding does not read). `train`, `sample` and `eval` run on the hub ids as they do on folders;
an id that is not cached fails in one line and writes nothing. (Which files a download fetches cannot be
watched offline: that is huggingface_hub's allow_patterns, given only the pipeline parts a command needs.)
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from diffusers import AutoencoderKL as TorchVAE
from diffusers import AutoencoderKLQwenImage as TorchQwenVAE
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline
from diffusers import FluxTransformer2DModel as TorchFlux
from diffusers import QwenImageTransformer2DModel as TorchQwen
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers import CLIPTextModel as TorchCLIP
from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwenVL
from transformers import T5EncoderModel as TorchT5

import real_tokenizers
from glance_jax import families
from glance_jax.checkpoints import hub
from glance_jax.cli import main
from glance_jax.errors import GlanceError
from glance_jax.lora import init_lora, save_lora
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
from glance_jax.qwen_image.adapter import SCHEDULER as QWEN_IMAGE_SCHEDULER
from test_bad_inputs import FLUX, TINY
from test_text import CLIP, QWEN, T5
from test_vae import QWEN_TINY
from torch_peers import randomize_

REPO, COMMIT = "black-forest-labs/FLUX.1-dev", "0123456789abcdef0123456789abcdef01234567"
QWEN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "qwen_image.py") + ":slow"
CAPTION = "a photo of the red fox"


def flux_dev_layout(folder):
    """A tiny FLUX.1-dev pipeline folder with the repository's layout and the real tokenizers."""
    vae = TorchVAE(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER),
                        vae=randomize_(vae, 1), text_encoder=randomize_(TorchCLIP(CLIP), 2), tokenizer=None,
                        text_encoder_2=randomize_(TorchT5(T5), 3), tokenizer_2=None,
                        transformer=randomize_(TorchFlux(**FLUX), 0))
    pipe.save_pretrained(folder)
    for part in ("transformer", "text_encoder_2"):  # sharded in the repository, with an index file
        shutil.rmtree(folder / part)
        getattr(pipe, part).save_pretrained(folder / part, max_shard_size="200KB")
    real_tokenizers.clip_tokenizer(folder / "tokenizer")
    real_tokenizers.t5_tokenizer(folder / "tokenizer_2")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "T5TokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def qwen_image_layout(folder):
    """A tiny Qwen-Image pipeline folder with the repository's layout and the real Qwen2.5-VL tokenizer."""
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER),
                             vae=randomize_(TorchQwenVAE(**QWEN_TINY), 1),
                             text_encoder=randomize_(TorchQwenVL(QWEN), 2), tokenizer=None,
                             transformer=randomize_(TorchQwen(**QWEN_TRANSFORMER), 0))
    pipe.save_pretrained(folder)
    for part in ("transformer", "text_encoder"):
        shutil.rmtree(folder / part)
        getattr(pipe, part).save_pretrained(folder / part, max_shard_size="200KB")
    real_tokenizers.qwen_tokenizer(folder / "tokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(tokenizer=["transformers", "Qwen2Tokenizer"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


QWEN_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6])
# family -> (hub id, layout, the train command's config)
REPOS = {"flux": ("black-forest-labs/FLUX.1-dev", flux_dev_layout, [TINY, "--config.phase", "slow"]),
         "qwen-image": ("Qwen/Qwen-Image", qwen_image_layout,
                        [QWEN_CONFIG, "--config.model.quantize", "none", "--config.model.dtype", "fp32",
                         "--config.lora.rank", "4", "--config.lora.alpha", "16"])}


def snapshot(root, repo):
    return root / "hf_home" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """HF_HOME's parent, with both repositories cached at COMMIT, a one-image sample, a LoRA file, prompts."""
    root = tmp_path_factory.mktemp("hub")
    for repo, layout, _ in REPOS.values():
        layout(snapshot(root, repo))
        (snapshot(root, repo).parent.parent / "refs").mkdir()
        (snapshot(root, repo).parent.parent / "refs" / "main").write_text(COMMIT)
        assert list(snapshot(root, repo).glob("transformer/*.safetensors.index.json"))
    sample = root / "sample"
    sample.mkdir()
    Image.open(load_sample_images().filenames[0]).resize((96, 64)).save(sample / "china.png")
    (sample / "china.txt").write_text(CAPTION)
    model, params = families.load_model(snapshot(root, REPO))
    tree = init_lora(jax.random.PRNGKey(0), params, "flux", 4, 16.0)
    save_lora(tree, root / "lora.safetensors")
    (root / "prompts.txt").write_text(CAPTION + "\n")
    return root


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub_cache / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def test_the_python_loaders_take_a_hub_id(offline):
    folder = snapshot(offline, REPO)
    assert hub.resolve(REPO) == hub.resolve(f"{REPO}@{COMMIT}") == str(folder)
    transformer, vae, text_encoders = families.model_paths(REPO)
    assert (transformer, vae, text_encoders) == (str(folder / "transformer"), str(folder / "vae"), str(folder))
    encoded = families.FLUX.prompt_encoder.from_pretrained(REPO, max_sequence_length=16)([CAPTION])
    want = families.FLUX.prompt_encoder.from_pretrained(folder, max_sequence_length=16)([CAPTION])
    np.testing.assert_array_equal(encoded["prompt_embeds"], want["prompt_embeds"])
    _, params = families.load_model(REPO)
    _, want = families.load_model(folder / "transformer")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)


@pytest.mark.parametrize("family", sorted(REPOS))
def test_train_sample_and_eval_on_a_hub_id(offline, capsys, family):
    repo, _, config = REPOS[family]
    out = offline / "out" / family
    code = main(["train", "--config", *config, "--workdir", str(out / "run"), "--config.model.path", repo,
                 "--config.data.dir", str(offline / "sample"), "--config.data.resolution", "64",
                 "--config.data.cache_dir", str(out / "cache"), "--config.steps", "2"])
    assert code == 0, capsys.readouterr().err
    lora = out / "run" / "slow_lora.safetensors"
    assert lora.exists()
    code = main(["sample", "--model", repo, "--prompt", CAPTION, "--out", str(out / "fox.png"), "--height", "64",
                 "--width", "64", "--slow_lora", str(lora), "--fast_lora", str(lora)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out / "fox.png") as image:
        assert image.size == (64, 64)
    code = main(["eval", "--model", f"{repo}@{COMMIT}", "--prompts", str(offline / "prompts.txt"),
                 "--workdir", str(out / "eval"), "--base_steps", "2", "--height", "64", "--width", "64",
                 "--slow_lora", str(lora), "--fast_lora", str(lora)])
    assert code == 0, capsys.readouterr().err
    assert (out / "eval" / "eval.json").exists()


@pytest.mark.parametrize("command", ["sample", "train", "export-lora"])
def test_an_id_not_in_the_cache_is_one_line(offline, capsys, command):
    missing = "black-forest-labs/FLUX.1-schnell"
    out = offline / "out_missing"
    args = {"sample": ["sample", "--model", missing, "--prompt", CAPTION, "--out", str(out / "fox.png")],
            "train": ["train", "--config", TINY, "--workdir", str(out / "run"), "--config.model.path", missing,
                      "--config.data.dir", str(offline / "sample")],
            "export-lora": ["export-lora", str(offline / "lora.safetensors"), str(out / "kohya.safetensors"),
                            "--model", missing]}[command]
    out.mkdir(exist_ok=True)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{missing}: no such local path, and hub model {missing} is not in" in err[0]
    assert "HF_HUB_OFFLINE is set" in err[0]
    assert list(out.iterdir()) == []
    with pytest.raises(GlanceError, match="no such local path"):
        families.load_model(missing)
