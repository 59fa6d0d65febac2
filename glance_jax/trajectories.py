"""The teacher's trajectories: the frozen base integrated from noise, and their cache.

For the teacher target (and the fitted schedule) the base integrates
`teacher.trajectories` noises on its own `teacher.substeps`-step grid plus the
Glance points, `teacher.batch` noises per compiled call, guided with
`teacher.guidance_scale` (FLUX.1-dev: its guidance input; other models: true
CFG on the empty prompt). The states are cached beside the encoded sample
under a key of everything that shapes them, so both phases and reruns reuse
them.
"""

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from glance_jax import families, schedules
from glance_jax.checkpoints import safetensors_io
from glance_jax.errors import GlanceError
from glance_jax.pipelines import euler_step
from glance_jax.train_step import caption_texts, conditioning


def teacher_grid(schedule, scheduler, substeps, image_seq_len):
    """Sigmas (descending, ending at 0) the base integrates on: its own `substeps`-step schedule (`scheduler`: a
    config dict or a family name) plus the schedule's points (if any), from the first point down."""
    _, grid = schedules.base_schedule(scheduler, substeps, image_seq_len)
    if schedule is None:
        return grid
    points = schedule.sigmas()
    fine = np.unique(np.concatenate([grid, points]))[::-1].astype(np.float32)
    return fine[fine <= points[0]]


def teacher_conditionings(model, batch, config):
    """(cond, negative or None, rescale) with which the frozen base draws its trajectories.

    `teacher.guidance_scale` > 1 guides them: FLUX.1-dev (a guidance embedding) takes the scale as its
    guidance input, one pass a step; other models run true CFG against the negative prompt, two passes a
    step, with the norm rescale for Qwen-Image (as their diffusers pipelines do).
    """
    scale = float(config.teacher.guidance_scale)
    cond = dict(batch["cond"])
    if families.of(model).takes_guidance(model):
        cond["guidance"] = jnp.full((1,), scale if scale > 1 else config.model.guidance, jnp.float32)
        return cond, None, False
    if scale <= 1:
        return cond, None, False
    return cond, negative_conditioning(batch, config.teacher.negative_prompt, "config.teacher.negative_prompt"), \
        families.of(model).cfg_rescale


def negative_conditioning(batch, negative_prompt, field):
    """The model inputs of true CFG's negative prompt: the sample's empty-prompt encoding, the one supported."""
    if negative_prompt.strip():
        raise GlanceError(f"{field} {negative_prompt!r}: only the empty prompt is supported (the sample's "
                          "empty_prompt_embeds)")
    if "empty_cond" not in batch:
        raise GlanceError(f"{field}: true CFG needs empty_prompt_embeds in the encoded sample (the negative prompt)")
    return conditioning(batch, True)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _integrate(model, static, rescale, params, noises, texts, sigmas, cond, neg, scale):
    """The sampler's Euler steps (pipelines.euler_step) of the (guided) base along `sigmas` for a batch of noises
    (M, 1, tokens, C) at once, noise m conditioned on the text inputs `texts[...][m]`, in float32; returns the
    states at every grid point, (M, len(sigmas), tokens, C)."""
    def one(noise, text, scale):
        conds = [{**cond, **text}] + ([] if neg is None else [neg])

        def step(x, sigmas):
            sigma, sigma_next = sigmas
            x = euler_step(model, static, {"params": params}, x, sigma, sigma_next - sigma, conds, scale, rescale)
            return x, x
        _, xs = jax.lax.scan(step, noise, (sigmas[:-1], sigmas[1:]))
        return jnp.concatenate([noise[None], xs])[:, 0]

    return jax.vmap(one)(noises, texts, scale)


def trajectory_scales(config):
    """The guidance scale of each teacher trajectory: teacher.guidance_range spread evenly over them, or
    teacher.guidance_scale for every one."""
    t = config.teacher
    if len(t.guidance_range):
        return np.linspace(*t.guidance_range, int(t.trajectories)).astype(np.float32)
    return np.full(int(t.trajectories), t.guidance_scale, np.float32)


def teacher_trajectories(model, static, params, batch, sigmas, config, key):
    """States (trajectories, len(sigmas), tokens, C) of the frozen base from `teacher.trajectories` noises,
    integrated `teacher.batch` noises per compiled call. The grid is padded with zero-size steps to a multiple
    of 16 points, so that grids of similar length share one compiled program."""
    cond, neg, rescale = teacher_conditionings(model, batch, config)
    noises = jax.random.normal(key, (config.teacher.trajectories, *batch["x0"].shape), jnp.float32)
    chunk = max(1, int(config.teacher.batch))
    n = len(sigmas)
    padded = jnp.asarray(np.pad(np.asarray(sigmas, np.float32), (0, -n % 16), mode="edge"))  # zero-size steps
    scales = jnp.asarray(trajectory_scales(config))
    parts = [_integrate(model, tuple(static), rescale, params, noises[i:i + chunk],
                        caption_texts(batch["teacher_texts"], np.arange(i, min(i + chunk, len(noises)))), padded,
                        cond, neg, scales[i:i + chunk])
             for i in tqdm(range(0, len(noises), chunk), desc="teacher trajectories", unit="batch", leave=False)]
    return jnp.concatenate(parts)[:, :n]


# ---- the cache ----

def cache_file(run, sigmas):
    """Where the trajectories of `run` on the grid `sigmas` are cached: the key covers the base's identity as the
    run's fingerprint has it, its dtype and quantization, the encoded sample, the grid, guidance, count and seed."""
    config, t = run.config, run.config.teacher
    key = [run.fingerprint["base"], config.model.dtype, config.model.quantize, int(t.trajectories),
           float(t.guidance_scale), t.negative_prompt, config.model.guidance, int(config.seed)]
    if len(t.guidance_range):
        key.append([float(x) for x in t.guidance_range])
    digest = hashlib.sha256(json.dumps(key).encode())
    for leaf in [np.asarray(sigmas, np.float32)] + jax.tree_util.tree_leaves(run.batch):
        digest.update(np.asarray(leaf).tobytes())
    return os.path.join(run.cache, "teacher-" + digest.hexdigest()[:32] + ".safetensors")


def cached(run, sigmas):
    """The base's trajectories for `run` (a prepared run, glance_jax.train.prepare) on the grid `sigmas`: read
    from the cache when an identical set was integrated before, else integrated and (by the writing process)
    cached."""
    path = cache_file(run, sigmas)
    if os.path.isfile(path):
        return jnp.asarray(safetensors_io.SafetensorsFile(path).read("states"))
    key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), 10 ** 6)
    states = teacher_trajectories(run.model, run.static, run.params, run.batch, sigmas, run.config, key)
    if run.writer:
        os.makedirs(run.cache, exist_ok=True)
        safetensors_io.save_file({"states": np.asarray(states), "sigmas": np.asarray(sigmas, np.float32)}, path)
    return states
