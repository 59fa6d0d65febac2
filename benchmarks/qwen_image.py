"""Qwen-Image: jit-compiled Flax forward against diffusers eager on the same CPU, and the full-size model.

Part 1, one process: hidden 512 (8 heads x 64), 6 dual-stream blocks, a 512 x 512 image (1024 packed
tokens), 128 text tokens of which 100 are real (masked padding), batch 1, fp32: median times and ratio.

Part 2, from abstract shapes: the full-size 60-block Qwen-Image (20B) at 1024 x 1024 (4096 image + 128
text tokens) in bf16: forward compile time and FLOPs; the LoRA train step (the Glance-Qwen preset,
rank 32) compile time, FLOPs and XLA's memory analysis.

    python benchmarks/qwen_image.py   # about 3 minutes on 2 CPU cores
"""

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import QwenImageTransformer2DModel as TorchQwen

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import interleaved_medians, report  # noqa: E402
from torch_peers import randomize_, relative_error  # noqa: E402

from glance_jax import analysis  # noqa: E402
from glance_jax.lora import init_lora  # noqa: E402
from glance_jax.models import QwenImageTransformer2DModel  # noqa: E402
from glance_jax.train import default_config  # noqa: E402
from glance_jax.train_step import make_train_step, optimizer  # noqa: E402

MID = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=64, num_attention_heads=8,
           joint_attention_dim=512, axes_dims_rope=[8, 28, 28])


def cpu_speed():
    torch_model = randomize_(TorchQwen(**MID), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = QwenImageTransformer2DModel.from_pretrained(tmp)
    rng = np.random.default_rng(0)
    grid, text = (32, 32), 128
    mask = np.zeros((1, text), np.int64)
    mask[0, :100] = 1
    inputs = dict(hidden_states=rng.standard_normal((1, grid[0] * grid[1], 64), dtype=np.float32),
                  encoder_hidden_states=rng.standard_normal((1, text, 512), dtype=np.float32),
                  encoder_hidden_states_mask=mask, timestep=np.array([0.5], np.float32))
    t_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run_torch():
        with torch.no_grad():
            return torch_model(**t_inputs, img_shapes=[[(1, *grid)]], return_dict=False)[0]

    forward = jax.jit(lambda p, x: model.apply({"params": p}, **x, img_shapes=[(1, *grid)]))
    j_inputs = jax.device_put(inputs)
    run_jax = lambda: forward(params, j_inputs).block_until_ready()
    err = relative_error(np.asarray(run_jax()), run_torch().numpy())
    t = interleaved_medians({"jax": run_jax, "torch": run_torch}, repeats=7)
    report("qwen_image_forward_cpu", config="hidden 512, 6 blocks, 1024 img + 128 txt tokens (100 real), fp32",
           torch_eager_ms=1e3 * t["torch"], jax_jit_ms=1e3 * t["jax"], speedup_jax_over_torch=t["torch"] / t["jax"],
           parity_relative_error=err)


def full_size():
    model = QwenImageTransformer2DModel(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    rows = cols = 64
    text = 128
    inputs = jax.eval_shape(lambda: {k: v for k, v in model.example_inputs(1, rows, cols, text).items()
                                     if k != "img_shapes"})
    static = {"img_shapes": [(1, rows, cols)]}
    figures = {}
    start = time.perf_counter()
    jax.jit(lambda p, x: model.apply({"params": p}, **x, **static)).lower(params, inputs).compile()
    figures["forward_compile_s"] = time.perf_counter() - start
    counted = analysis.for_cost_analysis(model)
    forward = analysis.flops(lambda p, x: counted.apply({"params": p}, **x, **static), params, inputs)
    figures["forward_tflop"] = forward / 1e12

    config = default_config("qwen-image", "slow")
    adapter = jax.eval_shape(lambda p: init_lora(jax.random.PRNGKey(0), p, "qwen-image", 32, 128.0), params)
    opt = optimizer(config.optim)
    opt_state = jax.eval_shape(opt.init, adapter)
    batch = dict(x0=jax.ShapeDtypeStruct((1, rows * cols, 64), jnp.float32),
                 cond=dict(encoder_hidden_states=jax.ShapeDtypeStruct((1, text, 3584), jnp.bfloat16),
                           encoder_hidden_states_mask=jax.ShapeDtypeStruct((1, text), jnp.int32)))
    teacher = {"sigmas": jax.ShapeDtypeStruct((11,), jnp.float32),
               "states": jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32)}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    points = jax.ShapeDtypeStruct((5,), jnp.int32)
    static_items = (("img_shapes", ((1, rows, cols),)),)
    for policy in ("none", "full"):
        m = model.clone(remat_policy=policy)
        start = time.perf_counter()
        compiled = make_train_step(m, config, static_items).lower(
            adapter, opt_state, params, batch, teacher, points, key).compile()
        figures[f"train_compile_s_remat_{policy}"] = time.perf_counter() - start
        figures[f"xla_cpu_train_temp_gib_remat_{policy}"] = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
        step_flops = analysis.flops(make_train_step(analysis.for_cost_analysis(m), config, static_items), adapter,
                                    opt_state, params, batch, teacher, points, key)
        figures[f"train_step_tflop_remat_{policy}"] = step_flops / 1e12
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    n_lora = sum(x.size for x in jax.tree_util.tree_leaves(adapter))
    figures["base_gib_bf16"] = 2 * n_params / 2 ** 30
    figures["lora_and_adam_gib_fp32"] = 3 * 4 * n_lora / 2 ** 30
    report("qwen_image_full_size_1024_bf16", **figures)


if __name__ == "__main__":
    cpu_speed()
    full_size()
