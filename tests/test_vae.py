"""The Flax VAEs against diffusers (fp32): encode, decode, tiled decode, conversion, the pipelines' images and the
trainer's encoding of a real photo."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import AutoencoderKLQwenImage as TorchQwenVAE
from diffusers import FluxTransformer2DModel as TorchFlux
from sklearn.datasets import load_sample_images

from glance_jax import checkpoints, data, families
from glance_jax.models import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel
from glance_jax.modules.tiling import tiled_decode
from glance_jax.pipelines import FluxGlancePipeline, decode_latents
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
from torch_peers import randomize_, relative_error

TOLERANCE = 1e-4
FLUX_TINY = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                 sample_size=64, scaling_factor=0.3611, shift_factor=0.1159)
QWEN_TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(t):
    return np.moveaxis(t.numpy(), 1, -1)


@pytest.fixture(scope="module")
def flux_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_vae")
    torch_vae = randomize_(TorchVAE(**FLUX_TINY), seed=0).eval()
    torch_vae.save_pretrained(path)
    return torch_vae, path, *AutoencoderKL.from_pretrained(path)


@pytest.fixture(scope="module")
def qwen_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_vae")
    torch_vae = randomize_(TorchQwenVAE(**QWEN_TINY), seed=1).eval()
    torch_vae.save_pretrained(path)
    return torch_vae, path, *AutoencoderKLQwenImage.from_pretrained(path)


def check_vae(torch_vae, vae, params, images, latents):
    """encode (mean, logvar) and decode against diffusers; returns the three errors."""
    with torch.no_grad():
        posterior = torch_vae.encode(nchw(images)).latent_dist
        decoded = torch_vae.decode(nchw(latents)).sample
    mean, logvar = vae.apply({"params": params}, images, method="encode")
    got = vae.apply({"params": params}, latents, method="decode")
    return (relative_error(mean, nhwc(posterior.mean)), relative_error(logvar, nhwc(posterior.logvar)),
            relative_error(got, nhwc(decoded)))


@pytest.mark.parametrize("size", [(32, 48), (64, 32)])
def test_flux_vae_matches_diffusers(flux_vae, size):
    torch_vae, _, vae, params = flux_vae
    rng = np.random.default_rng(size[0])
    images = rng.uniform(-1, 1, (2, *size, 3)).astype(np.float32)
    latents = rng.standard_normal((1, size[0] // 8, size[1] // 8, 16)).astype(np.float32)
    errors = check_vae(torch_vae, vae, params, images, latents)
    print(f"FLUX VAE {size}: mean {errors[0]:.2e}, logvar {errors[1]:.2e}, decode {errors[2]:.2e}")
    assert max(errors) <= TOLERANCE


def test_qwen_vae_matches_diffusers(qwen_vae):
    torch_vae, _, vae, params = qwen_vae
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (2, 1, 32, 48, 3)).astype(np.float32)
    latents = rng.standard_normal((1, 1, 4, 6, 4)).astype(np.float32)
    errors = check_vae(torch_vae, vae, params, images, latents)
    print(f"Qwen-Image VAE: mean {errors[0]:.2e}, logvar {errors[1]:.2e}, decode {errors[2]:.2e}")
    assert max(errors) <= TOLERANCE


@pytest.mark.parametrize("kind", ["flux", "qwen"])
def test_real_channel_configuration_at_a_small_size(kind, tmp_path):
    """The released channel widths (FLUX: 128/256/512/512, Qwen-Image: 96 x 1/2/4/4) on a 64 x 64 image."""
    torch_vae = randomize_(TorchVAE(latent_channels=16, block_out_channels=(128, 256, 512, 512),
                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                                    use_quant_conv=False, use_post_quant_conv=False) if kind == "flux"
                           else TorchQwenVAE(), seed=2).eval()
    torch_vae.save_pretrained(tmp_path)
    vae, params = families.load_model(tmp_path)
    rng = np.random.default_rng(4)
    shape = (1, 64, 64, 3) if kind == "flux" else (1, 1, 64, 64, 3)
    latent_shape = (1, 8, 8, 16) if kind == "flux" else (1, 1, 8, 8, 16)
    errors = check_vae(torch_vae, vae, params, rng.uniform(-1, 1, shape).astype(np.float32),
                       rng.standard_normal(latent_shape).astype(np.float32))
    print(f"{kind} VAE, released widths, 64x64: mean {errors[0]:.2e}, logvar {errors[1]:.2e}, decode {errors[2]:.2e}")
    assert max(errors) <= TOLERANCE


def test_tiled_decoding_matches_diffusers_tiling(flux_vae, qwen_vae):
    torch_vae, _, vae, params = flux_vae
    z = np.random.default_rng(5).standard_normal((1, 20, 28, 16)).astype(np.float32)
    torch_vae.enable_tiling()
    with torch.no_grad():
        want = nhwc(torch_vae.decode(nchw(z)).sample)
    torch_vae.disable_tiling()
    assert relative_error(tiled_decode(vae, params, z), want) <= TOLERANCE
    torch_vae, _, vae, params = qwen_vae
    z = np.random.default_rng(6).standard_normal((1, 1, 20, 28, 4)).astype(np.float32)
    torch_vae.enable_tiling(64, 64, 48, 48)
    with torch.no_grad():
        want = np.moveaxis(torch_vae.decode(torch.from_numpy(np.moveaxis(z, -1, 1))).sample.numpy(), 1, -1)
    torch_vae.disable_tiling()
    assert relative_error(tiled_decode(vae, params, z, 64, 48), want) <= TOLERANCE


def test_latent_normalisation_round_trips(flux_vae, qwen_vae):
    for _, _, vae, _ in (flux_vae, qwen_vae):
        z = np.random.default_rng(7).standard_normal((1, 4, 4, vae.latent_channels if hasattr(vae, "latent_channels")
                                                       else vae.z_dim)).astype(np.float32)
        np.testing.assert_allclose(vae.normalize(vae.denormalize(z)), z, atol=1e-5)
    _, _, vae, _ = flux_vae
    np.testing.assert_allclose(vae.normalize(np.full((1, 1, 1, 16), 0.1159 + 1.0, np.float32)), 0.3611,
                               rtol=1e-5)


def test_converter_handles_both_vaes(flux_vae, qwen_vae, tmp_path):
    for i, (_, path, vae, params) in enumerate((flux_vae, qwen_vae)):
        checkpoints.convert_checkpoint(path, tmp_path / f"vae{i}", families.CLASSES, dtype="fp32")
        again, converted = families.load_model(tmp_path / f"vae{i}")
        assert again == vae
        np.testing.assert_array_equal(converted["decoder"]["conv_out"]["kernel"],
                                      params["decoder"]["conv_out"]["kernel"])


def test_pipeline_returns_pil_and_np_images(flux_vae, tmp_path):
    _, _, vae, vae_params = flux_vae
    config = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    randomize_(TorchFlux(**config), seed=0).save_pretrained(tmp_path)
    model, params = FluxTransformer2DModel.from_pretrained(tmp_path)
    pipe = FluxGlancePipeline(model, params, FLUX_SCHEDULER, vae=(vae, vae_params))
    rng = np.random.default_rng(8)
    embeds, pooled = rng.standard_normal((1, 5, 24), dtype=np.float32), rng.standard_normal((1, 20), dtype=np.float32)
    [image] = pipe(embeds, pooled, height=48, width=80, num_inference_steps=2, output_type="pil")
    assert image.size == (80, 48) and image.mode == "RGB"
    array = pipe(embeds, pooled, height=48, width=80, num_inference_steps=2, output_type="np")
    assert array.shape == (1, 48, 80, 3) and 0 <= array.min() and array.max() <= 1
    latents = pipe(embeds, pooled, height=48, width=80, num_inference_steps=2, output_type="unpacked_latent")
    expected = np.clip(np.asarray(decode_latents(vae, vae_params, latents)) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(array, expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(image), (array[0] * 255).round().astype(np.uint8))


def test_trainer_encodes_the_photo_with_the_flax_vae_and_caches_it(flux_vae, tmp_path):
    import shutil

    from glance_jax.checkpoints import safetensors_io
    from glance_jax.train import default_config, prepare, train_phases
    torch_vae, vae_path, vae, vae_params = flux_vae
    config = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    randomize_(TorchFlux(**config), seed=0).save_pretrained(tmp_path / "base")
    sample = tmp_path / "sample"
    sample.mkdir()
    shutil.copy(load_sample_images().filenames[0], sample / "china.jpg")
    (sample / "china.txt").write_text("a temple")
    rng = np.random.default_rng(9)
    safetensors_io.save_file({"prompt_embeds": rng.standard_normal((5, 24), dtype=np.float32),
                              "pooled_prompt_embeds": rng.standard_normal((20,), dtype=np.float32)},
                             sample / "china.safetensors")  # text only: the latents come from the Flax VAE
    c = default_config("flux", "slow")
    c.model.path, c.model.vae_path, c.model.dtype = str(tmp_path / "base"), str(vae_path), "fp32"
    c.data.dir, c.data.resolution, c.data.cache_dir = str(sample), 128, str(tmp_path / "cache")
    c.steps, c.lora.rank, c.lora.alpha = 2, 4, 16.0
    first = prepare(c, tmp_path / "run")
    assert not first.cache_hit
    [s] = data.find_samples(str(sample), 128)
    with torch.no_grad():
        mean = torch_vae.encode(nchw(data.load_image(s)[None])).latent_dist.mean
    want = (nhwc(mean)[0] - 0.1159) * 0.3611
    from glance_jax.layout import pack_latents
    assert relative_error(np.asarray(first.batch["x0"]), np.asarray(pack_latents(want[None]))) <= TOLERANCE
    second = prepare(c, tmp_path / "run")
    assert second.cache_hit  # the VAE did not run again
    np.testing.assert_array_equal(second.batch["x0"], first.batch["x0"])
    train_phases(second)


def test_sample_command_writes_png_through_the_vae(flux_vae, tmp_path):
    import json

    from PIL import Image

    from glance_jax.checkpoints import safetensors_io
    from glance_jax.cli import main
    _, vae_path, _, _ = flux_vae
    config = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    randomize_(TorchFlux(**config), seed=0).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(10)
    safetensors_io.save_file({"prompt_embeds": rng.standard_normal((1, 5, 24), dtype=np.float32),
                              "pooled_prompt_embeds": rng.standard_normal((1, 20), dtype=np.float32)},
                             tmp_path / "embeds.safetensors", {"captions": json.dumps(["a red fox"])})
    out = tmp_path / "fox.png"
    assert main(["sample", "--model", str(tmp_path / "model"), "--vae", str(vae_path), "--embeddings",
                 str(tmp_path / "embeds.safetensors"), "--prompt", "a red fox", "--steps", "2", "--height", "48",
                 "--width", "64", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 48)
