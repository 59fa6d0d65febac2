"""The VAEs: decode time against diffusers eager on the same CPU, and the memory of a 2048 x 2048 decode.

Part 1, one process: the released channel configurations (FLUX.1: 128/256/512/512; Qwen-Image: 96 x
1/2/4/4) with random weights, decoding 256 x 256 images (32 x 32 latents), batch 1, fp32: medians and
ratios against diffusers' AutoencoderKL / AutoencoderKLQwenImage.

Part 2, from abstract shapes (no weights): XLA's memory analysis of decoding a 2048 x 2048 image whole,
against one tile of diffusers' default tiling (FLUX.1: 1024-pixel tiles, stride 768; Qwen-Image: 256,
stride 192) plus the decoded tiles that tiled decoding keeps on the host. fp32, as diffusers runs these
VAEs (force_upcast).

    python benchmarks/vae.py   # about 3 minutes on 2 CPU cores
"""

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import AutoencoderKLQwenImage as TorchQwenVAE

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import interleaved_medians, report  # noqa: E402
from torch_peers import randomize_, relative_error  # noqa: E402

from glance_jax import families  # noqa: E402
from glance_jax.models import AutoencoderKL, AutoencoderKLQwenImage  # noqa: E402

FLUX_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159)


def decode_speed(name, torch_vae, video):
    with tempfile.TemporaryDirectory() as tmp:
        torch_vae.save_pretrained(tmp)
        vae, params = families.load_model(tmp)
    shape = (1, 1, 32, 32, 16) if video else (1, 32, 32, 16)
    z = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t_z = torch.from_numpy(np.ascontiguousarray(np.moveaxis(z, -1, 1)))

    def run_torch():
        with torch.no_grad():
            return torch_vae.decode(t_z).sample

    decode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="decode"))
    run_jax = lambda: decode(params, z).block_until_ready()
    err = relative_error(np.asarray(run_jax()), np.moveaxis(run_torch().numpy(), 1, -1))
    t = interleaved_medians({"jax": run_jax, "torch": run_torch}, repeats=5)
    report(f"{name}_decode_256px_cpu", torch_eager_ms=1e3 * t["torch"], jax_jit_ms=1e3 * t["jax"],
           speedup_jax_over_torch=t["torch"] / t["jax"], parity_relative_error=err)


def decode_memory(name, vae, tile, stride, video):
    params = jax.eval_shape(vae.init_params, jax.random.PRNGKey(0))
    method = vae.tiling()[2]
    peak = lambda px: jax.jit(lambda p, x: vae.apply({"params": p}, x, method=method)).lower(
        params, jax.ShapeDtypeStruct(((1, 1) if video else (1,)) + (px // 8, px // 8, 16), jnp.float32)
    ).compile().memory_analysis()
    whole, one_tile = peak(2048), peak(tile)
    tiles = len(range(0, 2048 // 8, stride // 8)) ** 2
    host = tiles * tile * tile * 3 * 4 + 2048 * 2048 * 3 * 4  # decoded tiles kept, and the assembled image
    gib = lambda b: b / 2 ** 30
    report(f"{name}_decode_2048px_memory", whole_temp_gib=gib(whole.temp_size_in_bytes),
           tile_temp_gib=gib(one_tile.temp_size_in_bytes), tiles=tiles, tiled_host_buffers_gib=gib(host),
           tiled_total_gib=gib(one_tile.temp_size_in_bytes + host))


def main():
    decode_speed("flux_vae", randomize_(TorchVAE(**FLUX_VAE), seed=0).eval(), video=False)
    decode_speed("qwen_image_vae", randomize_(TorchQwenVAE(), seed=0).eval(), video=True)
    decode_memory("flux_vae", AutoencoderKL(), 1024, 768, video=False)
    decode_memory("qwen_image_vae", AutoencoderKLQwenImage(), 256, 192, video=True)


if __name__ == "__main__":
    main()
