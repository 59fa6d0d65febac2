"""Qwen-Image against diffusers: transformer parity, masks, conversion, LoRA layouts and the CFG sampler (fp32)."""

import gc
import logging

import jax
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers import QwenImageTransformer2DModel as TorchQwen
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from glance_jax import checkpoints, families, safe_io
from glance_jax.checkpoints import safetensors_io
from glance_jax.errors import GlanceError
from glance_jax.families import QWEN_IMAGE
from glance_jax.lora import load_lora, merge_lora, save_lora
from glance_jax.models import QwenImageTransformer2DModel
from glance_jax.pipelines import QwenImageGlancePipeline
from glance_jax.qwen_image.adapter import SCHEDULER as QWEN_IMAGE_SCHEDULER
from glance_jax.schedules import GlanceSchedule
from torch_peers import randomize_, relative_error

TOLERANCE = 1e-4
TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=[4, 6, 6])


def qwen_inputs(config, batch, grid, text_len, masks=None, seed=0):
    rng = np.random.default_rng(seed)
    h, w = grid
    inputs = dict(hidden_states=rng.standard_normal((batch, h * w, config["in_channels"]), dtype=np.float32),
                  encoder_hidden_states=rng.standard_normal((batch, text_len, config["joint_attention_dim"]),
                                                            dtype=np.float32),
                  timestep=rng.uniform(0.05, 1.0, (batch,)).astype(np.float32),
                  encoder_hidden_states_mask=masks)
    return inputs


def torch_qwen(model, inputs, grid):
    kw = {k: (torch.from_numpy(v) if v is not None else None) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**kw, img_shapes=[[(1, *grid)]] * len(inputs["timestep"]), return_dict=False)[0].numpy()


def jax_qwen(model, params, inputs, grid, lora=None):
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    return np.asarray(model.apply(variables, **inputs, img_shapes=[(1, *grid)] * len(inputs["timestep"])))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    torch_model = randomize_(TorchQwen(**TINY), seed=0).eval()
    torch_model.save_pretrained(path)
    model, params = QwenImageTransformer2DModel.from_pretrained(path)
    return torch_model, path, model, params


MASK_A = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0]], np.int64)  # lengths 9 and 4
MASK_B = np.array([[1, 0, 1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0, 1]], np.int64)  # any pattern


@pytest.mark.parametrize("grid,text_len,masks", [((3, 5), 9, MASK_A), ((4, 4), 9, MASK_B), ((2, 6), 1, None)])
def test_matches_diffusers(tiny, grid, text_len, masks):
    torch_model, _, model, params = tiny
    inputs = qwen_inputs(TINY, 2, grid, text_len, masks, seed=text_len)
    want = torch_qwen(torch_model, inputs, grid)
    got = jax_qwen(model, params, inputs, grid)
    err = relative_error(got, want)
    print(f"Qwen-Image grid={grid} text={text_len} masks={masks is not None}: {err:.2e}")
    assert got.shape == want.shape == (2, grid[0] * grid[1], 64) and err <= TOLERANCE


def test_padded_text_gives_the_unpadded_output(tiny):
    _, _, model, params = tiny
    inputs = qwen_inputs(TINY, 2, (3, 3), 9, MASK_A, seed=1)
    padded = jax_qwen(model, params, inputs, (3, 3))[1]
    alone = {k: v[1:] for k, v in inputs.items() if v is not None}
    alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :4]
    unpadded = jax_qwen(model, params, dict(alone, encoder_hidden_states_mask=None), (3, 3))[0]
    assert relative_error(padded, unpadded) <= 1e-5


def test_full_width_one_block_matches_diffusers(tmp_path):
    """hidden 3072 (24 x 128), RoPE axes (16, 56, 56), joint 3584, 64 in-channels, 1 block, 256 x 256."""
    config = dict(num_layers=1)
    torch_model = randomize_(TorchQwen(**config), seed=3).eval()
    torch_model.save_pretrained(tmp_path)
    full = dict(in_channels=64, joint_attention_dim=3584)
    inputs = qwen_inputs(full, 1, (16, 16), 32, np.array([[1] * 24 + [0] * 8]), seed=2)
    want = torch_qwen(torch_model, inputs, (16, 16))
    del torch_model
    gc.collect()
    model, params = QwenImageTransformer2DModel.from_pretrained(tmp_path)
    assert (model.num_attention_heads, model.attention_head_dim, model.joint_attention_dim) == (24, 128, 3584)
    err = relative_error(jax_qwen(model, params, inputs, (16, 16)), want)
    print(f"Qwen-Image full width, 1 block: {err:.2e}")
    assert err <= TOLERANCE


def test_converter_handles_qwen_image(tiny, tmp_path):
    _, path, model, params = tiny
    checkpoints.convert_checkpoint(path, tmp_path / "conv", families.CLASSES, dtype="fp32")
    again, converted = QwenImageTransformer2DModel.from_pretrained(tmp_path / "conv")
    assert again == model
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)
    config = safe_io.read_json(path / "config.json")
    with pytest.raises(GlanceError, match="zero_cond_t=True is not supported"):
        checkpoints.model_from_config(dict(config, zero_cond_t=True), checkpoints.parse_dtype("fp32"), families.CLASSES)
    from glance_jax.models import FluxTransformer2DModel
    with pytest.raises(GlanceError, match="holds a QwenImageTransformer2DModel, not a FluxTransformer2DModel"):
        FluxTransformer2DModel.from_pretrained(path)


@pytest.fixture(scope="module")
def official_style_lora(tiny, tmp_path_factory):
    """A LoRA on the twelve Glance-Qwen targets, saved as the official Glance files are: diffusers keys, no alpha."""
    torch_model, base_path, _, _ = tiny
    path = tmp_path_factory.mktemp("qwen_lora")
    peft_model = TorchQwen.from_pretrained(base_path).eval()
    peft_model.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=list(QWEN_IMAGE.lora_targets)))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    state = {f"transformer.{k}": v.numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    safetensors_io.save_file(state, path / "glance_qwen_slow.safetensors")  # no metadata: no alpha
    reference = TorchQwen.from_pretrained(base_path).eval()
    reference.load_lora_adapter(str(path), weight_name="glance_qwen_slow.safetensors", prefix="transformer")
    return path / "glance_qwen_slow.safetensors", state, reference


def test_official_glance_qwen_lora_layout(tiny, official_style_lora, caplog):
    _, _, model, params = tiny
    path, state, reference = official_style_lora
    assert len(state) == 2 * 12 * TINY["num_layers"]  # A and B for 12 targets in each block
    inputs = qwen_inputs(TINY, 2, (3, 4), 9, MASK_A, seed=4)
    want = torch_qwen(reference, inputs, (3, 4))
    with caplog.at_level(logging.INFO, logger="glance_jax"):
        tree = load_lora(path, params)
    assert "scale alpha/r = 1 " in caplog.text
    unmerged = relative_error(jax_qwen(model, params, inputs, (3, 4), tree), want)
    merged = relative_error(jax_qwen(model, merge_lora(params, tree, donate=False), inputs, (3, 4)), want)
    print(f"official-layout Qwen LoRA: unmerged {unmerged:.2e}, merged {merged:.2e}")
    assert unmerged <= TOLERANCE and merged <= TOLERANCE


def test_other_qwen_lora_layouts_and_export(tiny, official_style_lora, tmp_path):
    _, base_path, model, params = tiny
    path, state, reference = official_style_lora
    want_tree = load_lora(path, params)
    comfy = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in state.items()}
    kohya = {}
    for k, v in state.items():
        module, kind = k[len("transformer."):].rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = v
        kohya[f"{stem}.alpha"] = np.float32(v.shape[0] if kind.startswith("A") else v.shape[1])
    for name, tensors in (("comfy", comfy), ("kohya", kohya)):
        safetensors_io.save_file(tensors, tmp_path / f"{name}.safetensors")
        tree = load_lora(tmp_path / f"{name}.safetensors", params)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), tree, want_tree)
    inputs = qwen_inputs(TINY, 1, (2, 3), 5, None, seed=5)
    want = torch_qwen(reference, inputs, (2, 3))
    for fmt in ("diffusers", "kohya"):
        save_lora(want_tree, tmp_path / f"out_{fmt}.safetensors", format=fmt, family=families.QWEN_IMAGE)
        back = TorchQwen.from_pretrained(base_path).eval()
        sd = QwenImagePipeline.lora_state_dict(str(tmp_path / f"out_{fmt}.safetensors"))
        back.load_lora_adapter(sd, prefix="transformer")
        err = relative_error(torch_qwen(back, inputs, (2, 3)), want)
        print(f"Qwen LoRA exported as {fmt}, loaded by diffusers: {err:.2e}")
        assert err <= TOLERANCE


def qwen_pipeline(torch_model):
    """diffusers' QwenImagePipeline around `torch_model`, without VAE or text encoder (embeddings in, latents out)."""
    reference = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER),
                                  vae=None, text_encoder=None, tokenizer=None, transformer=torch_model)
    reference.vae_scale_factor = 8
    reference.set_progress_bar_config(disable=True)
    return reference


def test_sampler_with_true_cfg_matches_diffusers(tiny):
    torch_model, _, model, params = tiny
    reference = qwen_pipeline(torch_model)
    rng = np.random.default_rng(6)
    H, W = 64, 96
    inputs = dict(prompt_embeds=rng.standard_normal((2, 9, 24), dtype=np.float32), prompt_embeds_mask=MASK_A,
                  negative_prompt_embeds=rng.standard_normal((2, 3, 24), dtype=np.float32),
                  negative_prompt_embeds_mask=np.ones((2, 3), np.int64),
                  latents=rng.standard_normal((2, (H // 16) * (W // 16), 64), dtype=np.float32))
    with torch.no_grad():
        want = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}, height=H, width=W,
                         num_inference_steps=8, true_cfg_scale=5.0, output_type="latent").images.numpy()
    pipe = QwenImageGlancePipeline(model, params, QWEN_IMAGE_SCHEDULER)
    got = pipe(**inputs, height=H, width=W, num_inference_steps=8, true_cfg_scale=5.0)
    err = relative_error(got, want)
    print(f"Qwen-Image 8 steps with true CFG vs diffusers QwenImagePipeline: {err:.2e}")
    assert err <= TOLERANCE
    glance = pipe(**inputs, height=H, width=W, schedule=GlanceSchedule.official(QWEN_IMAGE_SCHEDULER, round_bf16=True),
                  true_cfg_scale=5.0, integration="official")
    assert glance.shape == got.shape and np.isfinite(np.asarray(glance)).all()


def test_two_pass_student_velocity_matches_diffusers_true_cfg_step(tiny, official_style_lora):
    """The trainer's two-pass student velocity (train_step.student_velocity: true CFG over two LoRA'd passes with the norm
    rescale) equals the velocity diffusers' QwenImagePipeline(true_cfg_scale=5) steps with, the same LoRA loaded
    through peft (fp32)."""
    from glance_jax import train_step
    from test_pipeline import recorded_steps
    _, _, model, params = tiny
    path, _, peft_model = official_style_lora
    reference = qwen_pipeline(peft_model)
    rng = np.random.default_rng(11)
    H, W = 64, 96
    inputs = dict(prompt_embeds=rng.standard_normal((2, 9, 24), dtype=np.float32), prompt_embeds_mask=MASK_A,
                  negative_prompt_embeds=rng.standard_normal((2, 3, 24), dtype=np.float32),
                  negative_prompt_embeds_mask=np.ones((2, 3), np.int64),
                  latents=rng.standard_normal((2, (H // 16) * (W // 16), 64), dtype=np.float32))
    calls = recorded_steps(reference)
    with torch.no_grad():
        reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}, height=H, width=W, num_inference_steps=3,
                  true_cfg_scale=5.0, output_type="latent")
    tree = load_lora(path, params)
    cond, static = model.conditioning({"prompt_embeds": inputs["prompt_embeds"],
                                       "prompt_embeds_mask": inputs["prompt_embeds_mask"]}, H // 16, W // 16)
    neg, _ = model.conditioning({"prompt_embeds": inputs["negative_prompt_embeds"],
                                 "prompt_embeds_mask": inputs["negative_prompt_embeds_mask"]}, H // 16, W // 16)
    assert len(calls) == 3
    for want, timestep, x in calls:
        got = train_step.student_velocity(model, static, params, tree, jax.numpy.asarray(x), timestep / 1000,
                                     [cond, neg], 5.0, QWEN_IMAGE.cfg_rescale)
        err = relative_error(got, want)
        print(f"two-pass student velocity at t={timestep:.1f} vs QwenImagePipeline(true_cfg_scale=5) + peft: {err:.2e}")
        assert err <= TOLERANCE
    unscaled = train_step.student_velocity(model, static, params, tree, jax.numpy.asarray(calls[1][2]),
                                      calls[1][1] / 1000, [cond, neg], 5.0, False)
    assert relative_error(unscaled, calls[1][0]) > 10 * TOLERANCE  # the check can fail: the rescale matters
