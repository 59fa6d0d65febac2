"""Train-step speed against the official recipe's structure in PyTorch, and the full-size FLUX.1-dev step.

Part 1, same CPU, one process: a small FLUX.1-dev-shaped model (hidden 384 = 6 heads x 64, 2 double +
4 single blocks) at 256 x 256 (256 packed tokens) with 64 text tokens, fp32, rank 16 / alpha 64 LoRA on
to_q, to_k, to_v, to_out.0, AdamW (5e-4, 0.9, 0.999, wd 0.01), clipping at 1.0, the official slow
timesteps. glance_jax's jit-compiled step against diffusers' transformer + peft LoRA + torch AdamW in
eager mode (the official training loop's structure). Reports median steps per second and the ratio.

Part 2, from abstract shapes (no weights): the full-size FLUX.1-dev LoRA train step at 1024 x 1024 in
bf16: compile time, FLOPs from XLA's cost analysis against 3x the forward's, and XLA's memory analysis.

    python benchmarks/train_step.py   # about 3 minutes on 2 CPU cores
"""

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FluxTransformer2DModel as TorchFlux
from peft import LoraConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import SMALL_FLUX, SMALL_SIZE, SMALL_TEXT, interleaved_medians, report  # noqa: E402
from torch_peers import randomize_  # noqa: E402

from glance_jax import analysis  # noqa: E402
from glance_jax.families import FLUX  # noqa: E402
from glance_jax.lora import init_lora  # noqa: E402
from glance_jax.models import FluxTransformer2DModel  # noqa: E402
from glance_jax.flux.transformer import image_ids as flux_image_ids  # noqa: E402
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER  # noqa: E402
from glance_jax.schedules import GlanceSchedule  # noqa: E402
from glance_jax.train import default_config  # noqa: E402
from glance_jax.train_step import make_train_step, optimizer  # noqa: E402

CONFIG, SIZE, TEXT = SMALL_FLUX, SMALL_SIZE, SMALL_TEXT


def peft_lora_step(torch_model, x0, embeds, pooled, sigmas, rows, points=5, rank=16, alpha=64.0, lr=5e-4):
    """The official training loop's step in PyTorch on a diffusers FLUX transformer: a peft LoRA (rank, alpha)
    on FLUX's Glance targets, torch AdamW (lr, 0.9, 0.999, wd 0.01), clipping at 1.0, the flow-matching loss
    at one of the first `points` sigmas. Tensors (x0, embeds, pooled) live on the model's device in its
    dtype; returns `step()`, which does not wait for the device."""
    torch_model.requires_grad_(False)
    torch_model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(FLUX.lora_targets),
                                       init_lora_weights="gaussian"))
    trainable = [p for p in torch_model.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    device, dtype = x0.device, x0.dtype
    img_ids = torch.from_numpy(flux_image_ids(rows, rows)).to(device)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device)
    draws, noises = torch.Generator().manual_seed(0), torch.Generator(device).manual_seed(0)
    guidance = torch.ones(1, device=device, dtype=dtype)

    def step():
        sigma = float(sigmas[int(torch.randint(0, points, (), generator=draws))])
        noise = torch.randn(x0.shape, generator=noises, device=device, dtype=dtype)
        x_t = (1 - sigma) * x0 + sigma * noise
        v = torch_model(hidden_states=x_t, timestep=torch.full((1,), sigma, device=device, dtype=dtype),
                        guidance=guidance, encoder_hidden_states=embeds, pooled_projections=pooled, img_ids=img_ids,
                        txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        torch_opt.step()
        torch_opt.zero_grad()

    return step


def cpu_speed():
    torch_model = randomize_(TorchFlux(**CONFIG), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = FluxTransformer2DModel.from_pretrained(tmp)
    tokens, rows = (SIZE // 16) ** 2, SIZE // 16
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, tokens, 64), dtype=np.float32)
    embeds = rng.standard_normal((1, TEXT, CONFIG["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((1, CONFIG["pooled_projection_dim"]), dtype=np.float32)
    schedule = GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=tokens)
    sigmas = np.float32(list(schedule.slow) + list(schedule.fast) + [0]) / 1000

    config = default_config("flux", "slow")
    opt = optimizer(config.optim)
    adapter = init_lora(jax.random.PRNGKey(0), params, "flux", 16, 64.0)
    state = {"adapter": adapter, "opt": opt.init(adapter)}
    batch = dict(x0=jnp.asarray(x0), cond=dict(
        encoder_hidden_states=jnp.asarray(embeds), pooled_projections=jnp.asarray(pooled),
        img_ids=jnp.asarray(flux_image_ids(rows, rows)), txt_ids=jnp.zeros((TEXT, 3)), guidance=jnp.ones(1)))
    teacher = {"sigmas": jnp.asarray(sigmas), "states": jnp.zeros((1, 1, 1, 1))}
    counter = [0]

    def jax_step_with(step_fn):
        def run():
            counter[0] += 1
            state["adapter"], state["opt"], out = step_fn(state["adapter"], state["opt"], params, batch, teacher,
                                                          jnp.arange(5), jax.random.PRNGKey(counter[0]))
            out["loss"].block_until_ready()
        return run

    jax_step = jax_step_with(make_train_step(model, config))
    jax_step_remat = jax_step_with(make_train_step(model.clone(remat_policy="dots_saveable"), config))

    torch_step = peft_lora_step(torch_model, *map(torch.from_numpy, (x0, embeds, pooled)), sigmas, rows)

    t = interleaved_medians({"jax": jax_step, "jax_remat": jax_step_remat, "torch": torch_step}, repeats=15,
                            warmup=2)
    report("train_step_cpu", config="hidden 384, 2 double + 4 single, 256x256, 64 text tokens, fp32, rank 16",
           jax_steps_per_sec=1 / t["jax"], jax_remat_dots_saveable_steps_per_sec=1 / t["jax_remat"],
           torch_steps_per_sec=1 / t["torch"], speedup_jax_over_torch=t["torch"] / t["jax"],
           speedup_jax_remat_over_torch=t["torch"] / t["jax_remat"])


def full_size():
    config = default_config("flux", "slow")
    model = FluxTransformer2DModel(guidance_embeds=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    adapter = jax.eval_shape(lambda p: init_lora(jax.random.PRNGKey(0), p, "flux", 16, 64.0), params)
    opt = optimizer(config.optim)
    opt_state = jax.eval_shape(opt.init, adapter)
    tokens, text = 4096, 512
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    batch = dict(x0=f32(1, tokens, 64), cond=dict(
        encoder_hidden_states=bf16(1, text, 4096), pooled_projections=bf16(1, 768), img_ids=f32(tokens, 3),
        txt_ids=f32(text, 3), guidance=f32(1)))
    teacher = {"sigmas": f32(11), "states": f32(1, 1, 1, 1)}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    points = jax.ShapeDtypeStruct((5,), jnp.int32)
    figures = {}
    for policy in ("none", "dots", "full"):
        m = model.clone(remat_policy=policy)
        step = make_train_step(m, config)
        start = time.perf_counter()
        compiled = step.lower(adapter, opt_state, params, batch, teacher, points, key).compile()
        figures[f"compile_s_remat_{policy}"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
        figures[f"xla_cpu_temp_gib_remat_{policy}"] = memory.temp_size_in_bytes / 2 ** 30
        counted = analysis.for_cost_analysis(m)
        step_flops = analysis.flops(make_train_step(counted, config), adapter, opt_state,
                                    params, batch, teacher, points, key)
        figures[f"train_step_tflop_remat_{policy}"] = step_flops / 1e12
    counted = analysis.for_cost_analysis(model)
    forward = analysis.flops(lambda p, adapter, b: counted.apply(
        {"params": p, "lora": adapter}, hidden_states=b["x0"].astype(jnp.bfloat16), timestep=jnp.ones(1),
        **b["cond"]), params, adapter, batch)
    figures["forward_tflop"] = forward / 1e12
    for policy in ("none", "dots", "full"):
        figures[f"step_over_3x_forward_remat_{policy}"] = figures[f"train_step_tflop_remat_{policy}"] * 1e12 / (
            3 * forward)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    n_lora = sum(x.size for x in jax.tree_util.tree_leaves(adapter))
    figures["base_gib_bf16"] = 2 * n_params / 2 ** 30
    figures["lora_and_adam_gib_fp32"] = 3 * 4 * n_lora / 2 ** 30
    report("train_step_full_size_flux_dev_1024_bf16", **figures)


if __name__ == "__main__":
    cpu_speed()
    full_size()
