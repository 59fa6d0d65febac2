"""Compiles the full-size FLUX.1-dev forward (19 double + 38 single blocks, 12B) from abstract shapes.

No weights are allocated: parameters and inputs are ShapeDtypeStructs, the
forward is lowered and compiled ahead of time for this machine's backend,
FLOPs come from XLA's cost analysis (see glance_jax.analysis) and buffer
sizes from its memory analysis, at 1024 x 1024 (4096 image + 512 text
tokens), bf16, batch 1.

    python benchmarks/flux_full_size_compile.py   # about 10 s on 2 CPU cores
"""

import argparse
import time

import jax
import jax.numpy as jnp

from glance_jax import analysis
from glance_jax.models import FluxTransformer2DModel


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--text_tokens", type=int, default=512)
    args = p.parse_args()
    model = FluxTransformer2DModel(guidance_embeds=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    image_tokens = (args.resolution // 16) ** 2

    start = time.perf_counter()
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    inputs = jax.eval_shape(lambda: model.example_inputs(1, image_tokens, args.text_tokens))
    lowered = jax.jit(model.apply).lower({"params": params}, **inputs)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    tflops = analysis.flops(analysis.for_cost_analysis(model).apply, {"params": params}, **inputs) / 1e12

    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    memory = compiled.memory_analysis()
    print(f"FLUX.1-dev full size: {n_params / 1e9:.2f} B parameters ({2 * n_params / 2**30:.1f} GiB in bf16)")
    print(f"  {image_tokens} image + {args.text_tokens} text tokens, batch 1, backend {jax.default_backend()}")
    print(f"  trace + lower: {lower_s:.1f} s, compile: {compile_s:.1f} s")
    print(f"  FLOPs per forward (XLA cost analysis): {tflops:.1f} TFLOP")
    if memory is not None:
        print(f"  XLA buffers on this backend: arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, "
              f"temporaries {memory.temp_size_in_bytes / 2**30:.2f} GiB, "
              f"output {memory.output_size_in_bytes / 2**20:.1f} MiB")
        if jax.default_backend() == "cpu":
            print("  (the CPU backend has no bf16 matmul: it converts the stacked bf16 weights to fp32, which")
            print("   inflates temporaries; accelerator figures come from compiling on the accelerator)")


if __name__ == "__main__":
    main()
