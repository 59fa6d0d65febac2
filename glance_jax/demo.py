"""`glance-jax demo`: PLACEHOLDER until the embedded demo lands.

It builds a tiny FLUX.1-dev-shaped transformer with random weights, runs one
jit-compiled forward pass on random inputs and prints what came out: proof
that the install works, not a demonstration of Glance.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from glance_jax.models import FluxTransformer2DModel


def main(argv):
    p = argparse.ArgumentParser(prog="glance-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  glance-jax demo --seed 0")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = FluxTransformer2DModel(in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                                   guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    key = jax.random.PRNGKey(args.seed)
    params = model.init_params(key)
    grid = 16  # a 16 x 16 grid of packed latent tokens: a 256 x 256 image
    ids = jnp.stack(jnp.meshgrid(jnp.zeros(1), jnp.arange(grid), jnp.arange(grid), indexing="ij"), -1).reshape(-1, 3)
    k1, k2, k3 = jax.random.split(key, 3)
    inputs = dict(hidden_states=jax.random.normal(k1, (1, grid * grid, 16)),
                  encoder_hidden_states=jax.random.normal(k2, (1, 16, 64)),
                  pooled_projections=jax.random.normal(k3, (1, 32)), timestep=jnp.array([0.5]),
                  img_ids=ids, txt_ids=jnp.zeros((16, 3)), guidance=jnp.array([3.5]))
    forward = jax.jit(model.apply)
    start = time.perf_counter()
    out = forward({"params": params}, **inputs).block_until_ready()
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    out = forward({"params": params}, **inputs).block_until_ready()
    print("glance-jax demo (placeholder: the Glance demo is not built yet)")
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"tiny FLUX transformer: {n_params / 1e6:.2f} M parameters, {model.num_layers} double + "
          f"{model.num_single_layers} single blocks, random weights")
    print(f"forward on {grid * grid} image + 16 text tokens: output {tuple(out.shape)}, "
          f"mean {float(out.mean()):+.4f}, std {float(out.std()):.4f}")
    print(f"compile + first run {compiled:.2f} s, then {1e3 * (time.perf_counter() - start):.1f} ms per forward "
          f"on {jax.devices()[0].platform}")
