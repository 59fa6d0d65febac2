"""Sampling time: 10 Glance steps (two LoRAs, official schedule) against 50 plain steps, and loop overhead.

One process, same CPU, a small FLUX.1-dev-shaped model with random weights
(hidden 384 = 6 heads x 64, 2 double + 4 single blocks), a 256 x 256 image
(256 packed tokens) and 64 text tokens, batch 1, fp32. Also times diffusers'
FluxPipeline (eager PyTorch) on the same weights for 50 steps, and a single
compiled forward (called 10 times) against a compiled 10-step loop, run in
turn, to measure what the loop adds per step (setup included).

    python benchmarks/glance_sampling.py   # about 2 minutes on 2 CPU cores
"""

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers import FluxTransformer2DModel as TorchFlux

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import SMALL_FLUX, SMALL_SIZE, SMALL_TEXT, interleaved_medians, report  # noqa: E402
from torch_peers import randomize_  # noqa: E402

from glance_jax.lora import init_lora  # noqa: E402
from glance_jax.models import FluxTransformer2DModel  # noqa: E402
from glance_jax.flux.transformer import image_ids as flux_image_ids  # noqa: E402
from glance_jax.pipelines import FluxGlancePipeline  # noqa: E402
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER  # noqa: E402
from glance_jax.schedules import GlanceSchedule  # noqa: E402

CONFIG, SIZE, TEXT = SMALL_FLUX, SMALL_SIZE, SMALL_TEXT


def diffusers_flux_pipeline(torch_model):
    """diffusers' FluxPipeline around a transformer alone (prompt embeddings in, latents out), FLUX's scheduler."""
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=torch_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    torch_model = randomize_(TorchFlux(**CONFIG), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model, params = FluxTransformer2DModel.from_pretrained(tmp)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, TEXT, CONFIG["joint_attention_dim"]), dtype=np.float32)
    pooled = rng.standard_normal((1, CONFIG["pooled_projection_dim"]), dtype=np.float32)
    tokens = (SIZE // 16) ** 2
    latents = rng.standard_normal((1, tokens, 64), dtype=np.float32)

    random_b = lambda key, tree: jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(key, x.shape) if p[-1].key == "B" else x, tree)
    slow = random_b(jax.random.PRNGKey(1), init_lora(jax.random.PRNGKey(0), params, "flux", 16, 64.0))
    fast = random_b(jax.random.PRNGKey(3), init_lora(jax.random.PRNGKey(2), params, "flux", 16, 64.0))
    pipe = FluxGlancePipeline(model, params, FLUX_SCHEDULER)
    schedule = GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=tokens)
    common = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents, height=SIZE, width=SIZE)

    plain50 = lambda: pipe(**common, num_inference_steps=50).block_until_ready()
    plain10 = lambda: pipe(**common, num_inference_steps=10).block_until_ready()
    glance10 = lambda: pipe(**common, schedule=schedule, slow_lora=slow, fast_lora=fast).block_until_ready()
    glance10_unmerged = lambda: pipe(**common, schedule=schedule, slow_lora=slow, fast_lora=fast,
                                     lora_mode="unmerged").block_until_ready()
    forward = jax.jit(model.apply)
    inputs = dict(hidden_states=jnp.asarray(latents), encoder_hidden_states=jnp.asarray(embeds),
                  pooled_projections=jnp.asarray(pooled), timestep=jnp.ones(1), guidance=jnp.full((1,), 3.5),
                  img_ids=jnp.asarray(flux_image_ids(SIZE // 16, SIZE // 16)), txt_ids=jnp.zeros((TEXT, 3)))
    one_forward = lambda: forward({"params": pipe.params}, **inputs).block_until_ready()

    reference = diffusers_flux_pipeline(torch_model)

    def torch50():
        with torch.no_grad():
            reference(prompt_embeds=torch.from_numpy(embeds), pooled_prompt_embeds=torch.from_numpy(pooled),
                      latents=torch.from_numpy(latents), height=SIZE, width=SIZE, num_inference_steps=50,
                      output_type="latent")

    t = interleaved_medians({"plain50": plain50, "plain10": plain10, "glance10": glance10,
                             "glance10_unmerged": glance10_unmerged, "torch50": torch50}, repeats=5)
    forward_10 = lambda: [one_forward() for _ in range(10)]
    t.update(interleaved_medians({"forward_x10": forward_10, "plain10": plain10}, repeats=7))
    t_forward = t["forward_x10"] / 10
    t_step = t["plain10"] / 10
    report("glance_sampling_cpu", config="hidden 384, 2 double + 4 single, 256x256, 64 text tokens, fp32, batch 1",
           plain_50_steps_s=t["plain50"], glance_10_steps_s=t["glance10"],
           speedup_glance_over_50=t["plain50"] / t["glance10"], glance_10_unmerged_s=t["glance10_unmerged"],
           single_forward_ms=1e3 * t_forward, loop_step_ms=1e3 * t_step,
           loop_overhead_per_step_pct=100 * (t_step - t_forward) / t_forward,
           diffusers_50_steps_s=t["torch50"], speedup_jax_50_over_diffusers_50=t["torch50"] / t["plain50"])


if __name__ == "__main__":
    main()
