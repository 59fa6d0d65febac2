"""Editing models against diffusers' edit pipelines (fp32, tiny random models): FLUX.1 Kontext."""

import json
import pathlib

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers import FluxTransformer2DModel as TorchFlux
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image

from glance_jax import families
from glance_jax.errors import GlanceError
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
from glance_jax.models import AutoencoderKL, FluxTransformer2DModel
from glance_jax.pipelines import FluxKontextGlancePipeline, GlancePipeline
from torch_peers import randomize_, relative_error

TOLERANCE = 1e-4
REPO = pathlib.Path(__file__).resolve().parent.parent
KONTEXT = dict(in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
           sample_size=64, scaling_factor=0.3611, shift_factor=0.1159)
B, H, W = 2, 64, 96  # the edit: a 4 x 6 grid of packed tokens


def source_image(height, width, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """A tiny FLUX.1 Kontext pipeline folder saved by diffusers, its torch pipeline, and ours loaded from it."""
    root = tmp_path_factory.mktemp("kontext")
    torch_pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER),
        vae=randomize_(TorchVAE(**VAE), seed=1).eval(), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=randomize_(TorchFlux(**KONTEXT), seed=0).eval())
    torch_pipe.set_progress_bar_config(disable=True)
    torch_pipe.save_pretrained(root)
    pipe = FluxKontextGlancePipeline(*FluxTransformer2DModel.from_pretrained(root / "transformer"), FLUX_SCHEDULER,
                                     vae=AutoencoderKL.from_pretrained(root / "vae"))
    rng = np.random.default_rng(3)
    inputs = dict(prompt_embeds=rng.standard_normal((B, 7, 24), dtype=np.float32),
                  pooled_prompt_embeds=rng.standard_normal((B, 20), dtype=np.float32),
                  latents=rng.standard_normal((B, (H // 16) * (W // 16), 64), dtype=np.float32))
    return root, torch_pipe, pipe, inputs


def run_diffusers(torch_pipe, **kw):
    with torch.no_grad():
        return torch_pipe(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()},
                          output_type="latent").images.numpy()


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kontext_matches_diffusers(kontext, cfg):
    """Latents after 6 steps from a 72 x 100 source image (cut to 64 x 96, its own size), guidance 3.5, with and
    without true CFG (two passes, the source image in both)."""
    _, torch_pipe, pipe, inputs = kontext
    rng = np.random.default_rng(4)
    negative = dict(negative_prompt_embeds=rng.standard_normal((B, 7, 24), dtype=np.float32),
                    negative_pooled_prompt_embeds=rng.standard_normal((B, 20), dtype=np.float32))
    kw = dict(inputs, **(negative if cfg > 1 else {}), image=source_image(72, 100, 0), height=H, width=W,
              max_area=H * W, _auto_resize=False, num_inference_steps=6, guidance_scale=3.5, true_cfg_scale=cfg)
    want = run_diffusers(torch_pipe, **kw)
    got = pipe(**kw)
    err = relative_error(got, want)
    print(f"FLUX.1 Kontext, 6 steps, true CFG {cfg}, vs diffusers FluxKontextPipeline: {err:.2e}")
    assert err <= TOLERANCE, f"{err:.2e} > {TOLERANCE}"
    assert pipe.last_nfe == (12 if cfg > 1 else 6)
    without = pipe(**{k: v for k, v in kw.items() if k != "image"}, image=source_image(72, 100, 1))
    assert relative_error(without, want) > 100 * TOLERANCE  # the source image matters


def test_kontext_sizes_are_diffusers():
    """The source image goes to the preferred Kontext resolution nearest its aspect ratio; the output to 1024 x 1024
    unless asked (diffusers' FluxKontextPipeline)."""
    family = families.FLUX_KONTEXT
    for height, width in [(100, 72), (1080, 1920), (512, 512), (333, 1000), (1000, 333), (700, 650)]:
        _, w, h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        assert family.reference_size(height, width) == (h // 16 * 16, w // 16 * 16)
        assert family.output_size(height, width) == (1024, 1024)


def test_kontext_is_told_by_its_pipeline_folder(kontext):
    """A Kontext folder holds FLUX.1's transformer class: its family comes from model_index.json."""
    root = kontext[0]
    assert families.of_pipeline(root) is families.FLUX_KONTEXT
    assert families.of_class_name("FluxTransformer2DModel") is families.FLUX


def test_edit_inputs_are_refused_in_one_line(kontext):
    _, _, pipe, inputs = kontext
    kw = dict(inputs, height=H, width=W, max_area=H * W, num_inference_steps=2)
    with pytest.raises(GlanceError, match="edits a source image: pass image="):
        pipe(**kw)
    with pytest.raises(GlanceError, match="2 source images: flux-kontext takes 1 to 1"):
        pipe(**kw, image=[source_image(64, 96, 0)] * 2)
    with pytest.raises(GlanceError, match=r"a source image of shape \(64, 96\)"):
        pipe(**kw, image=np.zeros((64, 96)))
    flux = GlancePipeline(pipe.model, pipe.params, FLUX_SCHEDULER, vae=pipe.vae)
    with pytest.raises(GlanceError, match="flux takes no source image"):
        flux.sample({k: inputs[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}, image=source_image(64, 96, 0),
                    height=H, width=W, num_inference_steps=2)


@pytest.fixture(scope="module")
def edit_inputs(kontext, tmp_path_factory):
    """A source image and an embeddings file (one instruction) for the command line."""
    root, _, _, inputs = kontext
    folder = tmp_path_factory.mktemp("edit_inputs")
    source_image(72, 100, 0).save(folder / "source.png")
    from glance_jax.checkpoints import safetensors_io
    safetensors_io.save_file({k: inputs[k][:1] for k in ("prompt_embeds", "pooled_prompt_embeds")},
                             folder / "prompts.safetensors", {"captions": '["make it red"]'})
    return folder


def test_sample_edits_the_source_image(kontext, edit_inputs, tmp_path):
    """`glance-jax sample --image` on a Kontext pipeline folder: the family from model_index.json, the source image
    resized to its preferred resolution, the output of the asked size; the same latents as the pipeline."""
    from glance_jax.checkpoints import safetensors_io
    from glance_jax.cli import main
    root, _, pipe, inputs = kontext
    out = tmp_path / "edit.safetensors"
    args = ["sample", "--model", str(root), "--embeddings", str(edit_inputs / "prompts.safetensors"),
            "--prompt", "make it red", "--height", "32", "--width", "48", "--steps", "2", "--seed", "1"]
    assert main([*args, "--image", str(edit_inputs / "source.png"), "--out", str(out)]) == 0
    got = safetensors_io.SafetensorsFile(out).read("latents")
    want = pipe.sample({k: inputs[k][:1] for k in ("prompt_embeds", "pooled_prompt_embeds")},
                       image=Image.open(edit_inputs / "source.png"), height=32, width=48, num_inference_steps=2,
                       seed=1, output_type="unpacked_latent")[0]
    assert got.shape == (4, 6, 16) and relative_error(got, np.asarray(want)) < 1e-5


@pytest.mark.parametrize("image,message", [
    (None, "--model is flux-kontext, an editing model: pass the source image with --image"),
    ("missing.png", "--image {folder}/missing.png: no such file"),
    ("prompts.safetensors", "--image {folder}/prompts.safetensors: not a readable image"),
])
def test_sample_refuses_a_bad_source_image(kontext, edit_inputs, tmp_path, capsys, image, message):
    from glance_jax.cli import main
    out = tmp_path / "edit.safetensors"
    args = ["sample", "--model", str(kontext[0]), "--embeddings", str(edit_inputs / "prompts.safetensors"),
            "--prompt", "make it red", "--height", "32", "--width", "48", "--steps", "2", "--out", str(out)]
    assert main(args + (["--image", str(edit_inputs / image)] if image else [])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glance-jax sample: error:"), err
    assert message.format(folder=edit_inputs) in err[0]
    assert not out.exists()


# ---- training on one edit ----

def write_edit_sample(root, size=(96, 64)):
    """An edit sample laid out as configs/flux_kontext.py describes: edited/NAME.png + NAME.txt, source/NAME.png, and
    random stand-ins for the text encodings (NAME.safetensors beside the edited image)."""
    (root / "edited").mkdir()
    (root / "source").mkdir()
    source_image(size[1], size[0], 5).save(root / "source" / "cat.png")
    Image.fromarray(255 - np.asarray(source_image(size[1], size[0], 5))).save(root / "edited" / "cat.png")
    (root / "edited" / "cat.txt").write_text("invert the colours")
    from glance_jax.checkpoints import safetensors_io
    rng = np.random.default_rng(0)
    safetensors_io.save_file({"prompt_embeds": rng.standard_normal((7, 24), dtype=np.float32),
                              "pooled_prompt_embeds": rng.standard_normal((20,), dtype=np.float32),
                              "empty_prompt_embeds": rng.standard_normal((7, 24), dtype=np.float32),
                              "empty_pooled_prompt_embeds": rng.standard_normal((20,), dtype=np.float32)},
                             root / "edited" / "cat.safetensors")


def kontext_config(root, folder, **overrides):
    import importlib.util
    spec = importlib.util.spec_from_file_location("flux_kontext", REPO / "configs" / "flux_kontext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.model.path, c.data.dir, c.data.sources = str(root), str(folder / "edited"), (str(folder / "source"),)
    c.data.resolution, c.data.multiple, c.data.cache_dir = 96, 16, str(folder / "cache")
    c.steps = 4
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_kontext_trains_on_one_edit_and_diffusers_applies_the_lora(kontext, tmp_path):
    """Both phases of the data target on one edit (the source image's latents beside the noised edit), then the
    exported Slow-LoRA in diffusers' FluxKontextPipeline (load_lora_weights) gives the latents it gives here."""
    from glance_jax import lora
    from glance_jax.train import train
    root, torch_pipe, pipe, inputs = kontext
    write_edit_sample(tmp_path)
    written = train(kontext_config(root, tmp_path, phase="both"), tmp_path / "run")
    assert set(written) == {"slow", "fast"}
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    tree = lora.load_lora(written["slow"], pipe.params)
    merged = FluxKontextGlancePipeline(pipe.model, lora.merged_params(pipe.params, tree), FLUX_SCHEDULER,
                                       vae=pipe.vae)
    kw = dict(inputs, image=source_image(72, 100, 0), height=H, width=W, max_area=H * W, _auto_resize=False,
              num_inference_steps=3, guidance_scale=3.5)
    torch_pipe.load_lora_weights(str(tmp_path / "run"), weight_name="slow_lora.safetensors")
    try:
        want = run_diffusers(torch_pipe, **kw)
    finally:
        torch_pipe.unload_lora_weights()
    got = merged(**kw)
    err = relative_error(got, want)
    print(f"Kontext Slow-LoRA trained here, in diffusers' FluxKontextPipeline vs here: {err:.2e}")
    assert err <= TOLERANCE, f"{err:.2e} > {TOLERANCE}"
    assert relative_error(pipe(**kw), want) > 100 * TOLERANCE  # the LoRA changed the output


def test_kontext_teacher_target_draws_trajectories_from_the_source(kontext, tmp_path):
    from glance_jax.train import prepare, train_phases
    root = kontext[0]
    write_edit_sample(tmp_path)
    config = kontext_config(root, tmp_path, phase="both", target="teacher", **{"teacher.trajectories": 2,
                                                                               "teacher.substeps": 10})
    run = prepare(config, tmp_path / "run")
    assert run.batch["cond"]["reference_hidden_states"].shape == (1, 24, 64)  # the 64 x 96 source, packed
    assert set(train_phases(run)) == {"slow", "fast"}


@pytest.mark.parametrize("problem,message", [
    ("no_source", "no source images named cat.* in {folder}/source (config.data.sources); one is needed"),
    ("size", "{folder}/source/cat.png: 80x64, its edit {folder}/edited/cat.png is 96x64; a source image and its "
             "edit must be the same size"),
    ("no_folder", "config.data.sources: flux-kontext edits 1 to 1 source image(s), one folder each; 0 given"),
])
def test_bad_edit_samples_are_refused_before_any_load(kontext, tmp_path, capsys, problem, message):
    from glance_jax.cli import main
    write_edit_sample(tmp_path)
    sources = f"('{tmp_path / 'source'}',)"
    if problem == "no_source":
        (tmp_path / "source" / "cat.png").unlink()
    elif problem == "size":
        source_image(64, 80, 5).save(tmp_path / "source" / "cat.png")
    elif problem == "no_folder":
        sources = "()"
    code = main(["train", "--config", str(REPO / "configs" / "flux_kontext.py") + ":tiny", "--workdir",
                 str(tmp_path / "run"), f"--config.model.path={kontext[0]}", f"--config.data.dir={tmp_path / 'edited'}",
                 f"--config.data.sources={sources}", "--config.data.resolution=96", "--config.data.multiple=16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("glance-jax train: error:"), err
    assert message.format(folder=tmp_path) in err[0], err[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ---- Qwen-Image-Edit and Qwen-Image-Edit-2509 (Plus): the sampler, with prompt embeddings given ----

QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=[4, 6, 6])
QWEN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def qwen_edit(tmp_path_factory):
    """Tiny Qwen-Image-Edit and -2509 pipelines (one transformer, one VAE) saved by diffusers, and ours."""
    from diffusers import AutoencoderKLQwenImage as TorchQwenVAE
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from diffusers import QwenImageTransformer2DModel as TorchQwen
    from glance_jax.models import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from glance_jax.pipelines import QwenImageEditGlancePipeline, QwenImageEditPlusGlancePipeline
    from glance_jax.qwen_image.adapter import SCHEDULER
    root = tmp_path_factory.mktemp("qwen_edit")
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER),
                 vae=randomize_(TorchQwenVAE(**QWEN_VAE), seed=1).eval(), text_encoder=None, tokenizer=None,
                 processor=None, transformer=randomize_(TorchQwen(**QWEN), seed=0).eval())
    torch_pipes = {"edit": QwenImageEditPipeline(**parts), "plus": QwenImageEditPlusPipeline(**parts)}
    for name, p in torch_pipes.items():
        p.set_progress_bar_config(disable=True)
        p.save_pretrained(root / name)
    base = (QwenImageTransformer2DModel.from_pretrained(root / "edit" / "transformer"), SCHEDULER)
    vae = AutoencoderKLQwenImage.from_pretrained(root / "edit" / "vae")
    ours = {"edit": QwenImageEditGlancePipeline(*base[0], base[1], vae=vae),
            "plus": QwenImageEditPlusGlancePipeline(*base[0], base[1], vae=vae)}
    return root, torch_pipes, ours


@pytest.mark.parametrize("variant,images", [("edit", 1), ("plus", 2)])
def test_qwen_image_edit_matches_diffusers(qwen_edit, variant, images):
    """Latents after 4 steps of true CFG 4 (two passes, norm rescale) from odd-sized source images, each VAE-encoded
    at about 1024 x 1024, the edit 64 x 96; prompt embeddings of different lengths (masks)."""
    _, torch_pipes, ours = qwen_edit
    rng = np.random.default_rng(6)
    mask = np.ones((B, 7), np.int64)
    mask[1, 5:] = 0
    inputs = dict(prompt_embeds=rng.standard_normal((B, 7, 24), dtype=np.float32), prompt_embeds_mask=mask,
                  negative_prompt_embeds=rng.standard_normal((B, 5, 24), dtype=np.float32),
                  negative_prompt_embeds_mask=np.ones((B, 5), np.int64),
                  latents=rng.standard_normal((B, (H // 16) * (W // 16), 16), dtype=np.float32))
    if variant == "plus":  # diffusers' QwenImageEditPlusPipeline takes one prompt at a time
        inputs = {k: v[:1] for k, v in inputs.items()}
    sources = [source_image(72, 100, 0), source_image(90, 60, 2)][:images]
    image = sources[0] if images == 1 else sources
    kw = dict(inputs, image=image, height=H, width=W, num_inference_steps=4, true_cfg_scale=4.0)
    want = run_diffusers(torch_pipes[variant], **kw)
    got = ours[variant](**kw)
    err = relative_error(got, want)
    print(f"Qwen-Image-{variant}, {images} source image(s), 4 steps of true CFG 4 vs diffusers: {err:.2e}")
    assert err <= TOLERANCE, f"{err:.2e} > {TOLERANCE}"
    assert ours[variant].last_nfe == 8


def test_qwen_image_edit_trains_on_one_edit_and_diffusers_applies_the_lora(qwen_edit, tmp_path):
    """configs/qwen_image_edit.py (both phases, the data target, caption dropout on the empty prompt) on one edit
    with precomputed text encodings; the Fast-LoRA in diffusers' QwenImageEditPipeline gives the latents it gives
    here."""
    import importlib.util
    from glance_jax import lora
    from glance_jax.checkpoints import safetensors_io
    from glance_jax.pipelines import QwenImageEditGlancePipeline
    from glance_jax.train import train
    root, torch_pipes, ours = qwen_edit
    write_edit_sample(tmp_path)
    rng = np.random.default_rng(1)
    safetensors_io.save_file({"prompt_embeds": rng.standard_normal((7, 24), dtype=np.float32),
                              "empty_prompt_embeds": rng.standard_normal((5, 24), dtype=np.float32)},
                             tmp_path / "edited" / "cat.safetensors")
    spec = importlib.util.spec_from_file_location("qwen_image_edit", REPO / "configs" / "qwen_image_edit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("both")
    c.model.path, c.data.dir, c.data.sources = str(root / "edit"), str(tmp_path / "edited"), (str(tmp_path / "source"),)
    c.model.dtype, c.model.quantize, c.data.cache_dir = "fp32", "none", str(tmp_path / "cache")
    c.data.resolution, c.data.multiple, c.steps, c.lora.rank, c.lora.alpha = 96, 16, 4, 4, 16.0
    written = train(c, tmp_path / "run")
    assert set(written) == {"slow", "fast"}
    pipe = ours["edit"]
    merged = QwenImageEditGlancePipeline(pipe.model, lora.merged_params(pipe.params, lora.load_lora(
        written["fast"], pipe.params)), pipe.scheduler_config, vae=pipe.vae)
    rng = np.random.default_rng(2)
    kw = dict(prompt_embeds=rng.standard_normal((1, 7, 24), dtype=np.float32), image=source_image(72, 100, 0),
              latents=rng.standard_normal((1, 24, 16), dtype=np.float32), height=H, width=W, num_inference_steps=3)
    torch_pipes["edit"].load_lora_weights(str(tmp_path / "run"), weight_name="fast_lora.safetensors")
    try:
        want = run_diffusers(torch_pipes["edit"], **kw)
    finally:
        torch_pipes["edit"].unload_lora_weights()
    err = relative_error(merged(**kw), want)
    print(f"Qwen-Image-Edit Fast-LoRA trained here, in diffusers' QwenImageEditPipeline vs here: {err:.2e}")
    assert err <= TOLERANCE, f"{err:.2e} > {TOLERANCE}"
    assert relative_error(pipe(**kw), want) > 10 * TOLERANCE  # the LoRA (4 steps at lr 3e-4) changed the output


# ---- a Qwen-Image-Edit folder laid out as the released repository: prompts that see the source image ----

@pytest.fixture(scope="module")
def qwen_edit_repo(tmp_path_factory):
    """transformer/, vae/, scheduler/, text_encoder/ (a tiny Qwen2.5-VL with its vision tower), tokenizer/ and
    processor/ (the real Qwen2.5 tokenizer), model_index.json; and diffusers' pipeline over the same parts."""
    from diffusers import AutoencoderKLQwenImage as TorchQwenVAE
    from diffusers import QwenImageEditPipeline
    from diffusers import QwenImageTransformer2DModel as TorchQwen
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwenVL
    from glance_jax.qwen_image.adapter import SCHEDULER
    from test_qwen_vl import QWEN_VL, PREPROCESSOR, processor_without_torchvision, tame_patch_embed_
    import real_tokenizers
    root = tmp_path_factory.mktemp("qwen_edit_repo")
    real_tokenizers.qwen_tokenizer(root / "tokenizer")
    AutoTokenizer.from_pretrained(root / "tokenizer").save_pretrained(root / "processor")
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    text_encoder = randomize_(TorchQwenVL(QWEN_VL), seed=7).eval()
    tame_patch_embed_(text_encoder.model.visual)
    text_encoder.save_pretrained(root / "text_encoder")
    transformer = randomize_(TorchQwen(**dict(QWEN, joint_attention_dim=32)), seed=0).eval()
    vae = randomize_(TorchQwenVAE(**QWEN_VAE), seed=1).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
    for name, part in (("transformer", transformer), ("vae", vae), ("scheduler", scheduler)):
        part.save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImageEditPipeline", "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen2VLProcessor"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"]}))
    processor = processor_without_torchvision(Qwen2VLImageProcessorPil.from_pretrained(root / "processor"),
                                              AutoTokenizer.from_pretrained(root / "processor"))
    reference = QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                      tokenizer=processor.tokenizer, processor=processor, transformer=transformer)
    reference.set_progress_bar_config(disable=True)
    source = root / "source.png"
    source_image(72, 100, 0).save(source)
    return root, reference, source


def test_qwen_image_edit_from_prompt_strings_matches_diffusers(qwen_edit_repo):
    """The whole pipeline from the instruction and the source image: Qwen2.5-VL sees the image (as diffusers 0.42
    under transformers 5 numbers its positions: the prompt encoder's mrope=False), the VAE encodes it, true CFG 4."""
    from glance_jax.models import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from glance_jax.pipelines import QwenImageEditGlancePipeline
    from glance_jax.qwen_image.adapter import SCHEDULER
    from glance_jax.qwen_image_edit.prompts import QwenImageEditPromptEncoder
    root, reference, source = qwen_edit_repo
    latents = np.random.default_rng(8).standard_normal((1, 24, 16), dtype=np.float32)
    kw = dict(prompt="make the sky red", negative_prompt=" ", image=Image.open(source), height=H, width=W,
              num_inference_steps=3, true_cfg_scale=4.0, latents=latents)
    want = run_diffusers(reference, **kw)
    pipe = QwenImageEditGlancePipeline(*QwenImageTransformer2DModel.from_pretrained(root / "transformer"), SCHEDULER,
                                       vae=AutoencoderKLQwenImage.from_pretrained(root / "vae"),
                                       prompt_encoder=QwenImageEditPromptEncoder.from_pretrained(root, mrope=False))
    err = relative_error(pipe(**kw), want)
    print(f"Qwen-Image-Edit from prompt strings (the VL encoder seeing the image), 3 steps of true CFG 4, vs "
          f"diffusers: {err:.2e}")
    assert err <= TOLERANCE, f"{err:.2e} > {TOLERANCE}"


def test_sample_and_train_on_a_qwen_image_edit_folder(qwen_edit_repo, tmp_path):
    """`glance-jax sample --image` and `glance-jax train` with configs/qwen_image_edit.py on the folder alone: its
    family from model_index.json, the instruction encoded by its Qwen2.5-VL seeing the source image."""
    from glance_jax.checkpoints import safetensors_io
    from glance_jax.cli import main
    root, _, source = qwen_edit_repo
    out = tmp_path / "edit.safetensors"
    assert main(["sample", "--model", str(root), "--prompt", "make the sky red", "--image", str(source),
                 "--height", "32", "--width", "48", "--steps", "2", "--out", str(out)]) == 0
    assert safetensors_io.SafetensorsFile(out).read("latents").shape == (4, 6, 4)
    write_edit_sample(tmp_path)
    (tmp_path / "edited" / "cat.safetensors").unlink()  # the text encoder of the folder encodes the instruction
    code = main(["train", "--config", str(REPO / "configs" / "qwen_image_edit.py") + ":slow", "--workdir",
                 str(tmp_path / "run"), f"--config.model.path={root}", f"--config.data.dir={tmp_path / 'edited'}",
                 f"--config.data.sources=('{tmp_path / 'source'}',)", "--config.data.resolution=96",
                 "--config.data.multiple=16", "--config.model.dtype=fp32", "--config.model.quantize=none",
                 "--config.steps=2", f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.lora.rank=4",
                 "--config.lora.alpha=16"])
    assert code == 0 and (tmp_path / "run" / "slow_lora.safetensors").exists()
    cached = [f for f in (tmp_path / "cache").iterdir() if f.suffix == ".safetensors"]
    keys = set(safetensors_io.SafetensorsFile(cached[0]).keys())
    assert {"latents", "source_latents_0", "prompt_embeds", "empty_prompt_embeds"} <= keys


def test_kontext_on_a_quantized_base(kontext):
    """An 8-bit base edits as the float one, to the quantization's rounding (the source tokens go through the
    same quantized kernels)."""
    root, _, pipe, inputs = kontext
    kw = dict(inputs, image=source_image(72, 100, 0), height=H, width=W, max_area=H * W, _auto_resize=False,
              num_inference_steps=4)
    want = pipe(**kw)
    quantized = FluxKontextGlancePipeline(*FluxTransformer2DModel.from_pretrained(root / "transformer"),
                                          FLUX_SCHEDULER, vae=pipe.vae, quantize="int8")
    err = relative_error(quantized(**kw), np.asarray(want))
    print(f"FLUX.1 Kontext on an int8 base vs fp32, 4 steps: {err:.2e}")
    assert err < 2e-2, f"{err:.2e}"
