"""Jit-compiled Flax FLUX forward against diffusers eager PyTorch, same CPU, same weights, one process.

Mid-size config: hidden 512 (8 heads x 64), 4 double + 8 single blocks,
a 512 x 512 image (1024 packed latent tokens) and 128 text tokens, batch 1,
fp32. Prints median times, their ratio and the parity error.

    python benchmarks/flux_forward.py            # about 2 minutes on 2 CPU cores
"""

import argparse
import tempfile

import jax
import numpy as np
import torch
from diffusers import FluxTransformer2DModel as TorchFlux

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import median_seconds, report  # noqa: E402
from torch_peers import flux_inputs, randomize_, relative_error  # noqa: E402

from glance_jax.models import FluxTransformer2DModel  # noqa: E402

CONFIG = dict(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=8,
              joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=[8, 28, 28])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch_model = randomize_(TorchFlux(**CONFIG), seed=0).eval()
    inputs = flux_inputs(CONFIG, batch=1, grid=(32, 32), text_len=128)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = FluxTransformer2DModel.from_pretrained(tmp)

    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run_torch():
        with torch.no_grad():
            return torch_model(**torch_inputs, return_dict=False)[0]

    forward = jax.jit(model.apply)
    jax_inputs = jax.device_put(inputs)
    run_jax = lambda: forward({"params": params}, **jax_inputs).block_until_ready()

    err = relative_error(np.asarray(run_jax()), run_torch().numpy())
    t_torch = median_seconds(run_torch, args.repeats)
    t_jax = median_seconds(run_jax, args.repeats)
    report("flux_forward_cpu", config="hidden 512, 4 double + 8 single, 1024 img + 128 txt tokens, fp32",
           torch_threads=torch.get_num_threads(), jax_device=str(jax.devices()[0]),
           torch_eager_ms=1e3 * t_torch, jax_jit_ms=1e3 * t_jax, speedup_jax_over_torch=t_torch / t_jax,
           parity_relative_error=err)


if __name__ == "__main__":
    main()
