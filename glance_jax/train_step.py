"""The Glance loss and train step, as module-level pure functions.

One step draws a Glance point among the phase's (`points`, a mask over
`teacher["sigmas"]`) and regresses the LoRA'd model's velocity there on its
target: `noise - x0` at `x_t = (1 - sigma) x0 + sigma noise` (the data target,
the paper), or the jump the frozen base makes from its own state at that point
to its state at the next one (the teacher target; `teacher["states"]` holds
those states, see glance_jax.trajectories). AdamW then updates the LoRA; the
base is never touched.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from glance_jax import checkpoints, families
from glance_jax.pipelines import velocity


class Settings(NamedTuple):
    """What, besides the model, shapes the step's program (hashable: one compiled step per distinct value)."""

    optim: tuple  # config.optim's (name, value) pairs
    target: str  # "data" or "teacher"
    caption_dropout: float
    minibatch: int  # (trajectory, point) draws averaged in one step
    student_scale: float  # > 1: the student samples with true CFG, two LoRA'd passes a step
    rescale: bool  # the family's CFG norm rescale
    guidance_input: bool  # the student trains a guidance embedding, fed the trajectory's scale


def settings(model, config):
    """The step's `Settings` from a run config and its model."""
    return Settings(tuple(sorted(config.optim.items())), config.target, float(config.data.caption_dropout),
                    int(config.teacher.minibatch), float(config.student.guidance_scale),
                    families.of(model).cfg_rescale, bool(config.student.guidance_input))


# ---- the optimizer ----

def learning_rate(optim):
    """Linear warm-up from 0 over `warmup_steps`, then constant (diffusers' constant_with_warmup); `optim` is
    config.optim."""
    if optim["warmup_steps"] <= 0:
        return optax.constant_schedule(optim["lr"])
    return optax.join_schedules([optax.linear_schedule(0.0, optim["lr"], optim["warmup_steps"]),
                                 optax.constant_schedule(optim["lr"])], [optim["warmup_steps"]])


def optimizer(optim):
    """AdamW (by config.optim) with global-norm clipping on the LoRA's A and B; alpha is not trained."""
    adamw = optax.chain(optax.clip_by_global_norm(optim["grad_clip"]),
                        optax.adamw(learning_rate(optim), b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                                    weight_decay=optim["weight_decay"]))
    if optim["state_dtype"] not in ("fp32", "float32"):
        adamw = stored_in(adamw, checkpoints.parse_dtype(optim["state_dtype"]))
    labels = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if path[-1].key == "alpha" else "trained", tree)
    return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels)


def stored_in(transform, dtype):
    """`transform` whose float state (Adam's moments) is kept in `dtype` between steps and updated in float32.

    bf16 moments stand in for the official Qwen-Image recipe's 8-bit Adam: half the state memory.
    """
    def cast(tree, to):
        return jax.tree_util.tree_map(
            lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x, tree)

    def update(updates, state, params=None):
        updates, state = transform.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(transform.init(params), dtype), update)


# ---- the step's inputs ----

def conditioning(batch, drop_caption, texts=None):
    """The model's keyword inputs besides hidden_states and timestep, with the text inputs `texts` instead of
    the caption's if given; the empty prompt's if `drop_caption`."""
    empty = batch.get("empty_cond", {})
    cond = {**batch["cond"], **(texts or {})}
    return {k: jnp.where(drop_caption, empty[k], v) if k in empty else v for k, v in cond.items()}


def caption_texts(texts, k):
    """The text inputs (of `batch["teacher_texts"]`) that trajectory k, an index or an array of them, is drawn
    and trained with: caption k mod N."""
    count = jax.tree_util.tree_leaves(texts)[0].shape[0]
    return jax.tree_util.tree_map(lambda t: t[k % count], texts)


def student_velocity(model, static, params, adapter, x_t, sigma, conds, guidance_scale, rescale):
    """The LoRA'd model's velocity at `x_t` (B, tokens, C), as the sampler computes it (pipelines.velocity): one
    pass with one conditioning; with two (caption, negative prompt) true CFG at `guidance_scale`, with the
    family's rescale."""
    return velocity(model, static, {"params": params, "lora": adapter}, x_t.astype(model.dtype),
                    jnp.full((x_t.shape[0],), sigma), conds, guidance_scale, rescale)


# ---- the loss and the step ----

def loss_fn(model, static, settings, adapter, params, batch, teacher, points, key):
    """(loss, timestep): the squared error of the student's velocity against the target at one drawn point."""
    k_t, k_noise, k_drop, k_traj = jax.random.split(key, 4)
    index = jax.random.choice(k_t, points.shape[0], p=points / jnp.sum(points))
    sigma = teacher["sigmas"][index]
    drop = jax.random.uniform(k_drop) < settings.caption_dropout
    if settings.target == "teacher":  # the velocity that carries the base's state here to its next point
        k = jax.random.randint(k_traj, (), 0, teacher["states"].shape[0])
        conds = [conditioning(batch, drop, caption_texts(teacher["texts"], k))]
        if settings.guidance_input:  # the trajectory's guidance scale, into the trained guidance embedding
            conds[0]["guidance"] = jnp.full((1,), teacher["scales"][k])
        if settings.student_scale > 1:  # the student samples with true CFG: both LoRA'd passes, combined
            conds.append(conditioning(batch, True))
        x_t = teacher["states"][k, index][None]
        target = (teacher["states"][k, index + 1][None] - x_t) / (teacher["sigmas"][index + 1] - sigma)
    else:
        x0 = batch["x0"]
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t = (1 - sigma) * x0 + sigma * noise
        target = noise - x0
        conds = [conditioning(batch, drop)]
    v = student_velocity(model, static, params, adapter, x_t, sigma, conds, settings.student_scale,
                         settings.rescale)
    return jnp.mean(jnp.square(v - target)), sigma * 1000


def mean_loss(model, static, settings, adapter, params, batch, teacher, points, key):
    """The loss averaged over `settings.minibatch` draws (the teacher target: trajectories and points)."""
    one = functools.partial(loss_fn, model, static, settings)
    if settings.minibatch == 1:
        return one(adapter, params, batch, teacher, points, key)
    keys = jax.random.split(key, settings.minibatch)
    losses, timesteps = jax.vmap(one, in_axes=(None, None, None, None, None, 0))(
        adapter, params, batch, teacher, points, keys)
    return jnp.mean(losses), jnp.mean(timesteps)


def train_step(model, static, settings, adapter, opt_state, params, batch, teacher, points, key):
    """One AdamW step of the LoRA on `mean_loss`: (adapter, opt_state, metrics)."""
    loss = functools.partial(mean_loss, model, static, settings)
    (value, timestep), grads = jax.value_and_grad(loss, has_aux=True)(adapter, params, batch, teacher, points,
                                                                      key)
    updates, opt_state = optimizer(dict(settings.optim)).update(grads, opt_state, adapter)
    adapter = optax.apply_updates(adapter, updates)
    return adapter, opt_state, {"loss": value, "timestep": timestep, "grad_norm": optax.global_norm(grads)}


def make_train_step(model, config, static=(), shardings=None):
    """The jit-compiled step `(adapter, opt_state, params, batch, teacher, points, key) -> (adapter, opt_state,
    metrics)`; the LoRA and optimizer state are donated. `points` is a mask over `teacher["sigmas"]` marking
    the phase's timesteps (drawn uniformly among them). Steps that would compile to the same program are
    shared (both phases, several runs). With `shardings=(in_shardings, out_shardings)` the step is compiled
    for a device mesh.
    """
    step = functools.partial(train_step, model, tuple(static), settings(model, config))
    if shardings is None:
        return _compiled_train_step(model, settings(model, config), tuple(static))
    return jax.jit(step, in_shardings=shardings[0], out_shardings=shardings[1], donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _compiled_train_step(model, settings, static):
    return jax.jit(functools.partial(train_step, model, static, settings), donate_argnums=(0, 1))
