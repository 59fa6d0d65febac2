"""The LoRA API: new adapters on the Dense layers that diffusers module names (or a family's preset) pick,
and, imported here where the docs list them, the tree operations (`lora_tree`) and the files (`lora_formats`).

A LoRA tree mirrors the base parameter tree down to the targeted Dense
layers (see `lora_tree`). Targets are diffusers module names
(`transformer_blocks.3.attn.to_q`) matched the way PEFT matches them.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from glance_jax import families
from glance_jax.errors import GlanceError
from glance_jax import lora_formats
from glance_jax.lora_formats import (  # noqa: F401 (documented here)
    dense_layers, describe, read_guidance, read_schedule, save_lora)
from glance_jax.lora_tree import (  # noqa: F401 (documented here)
    GUIDANCE_EMBEDDER, check_shapes, check_values, guidance_embedder, guidance_embedder_alone, merge_lora,
    merged_params, modules_of, new_guidance_embedder, unmerge_lora, with_guidance_embedder)


def matches(name, patterns):
    """PEFT's target_modules rule: a regular expression (str) matches the whole name; a list of names matches
    the module name itself or a suffix after a dot."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def load_lora(path_or_state_dict, params, strict=True):
    """A LoRA tree for `params` from a diffusers/PEFT, kohya or ComfyUI file (or folder, or state dict), with
    module names as diffusers or any model family's own file names give them (`lora_formats.load_lora`)."""
    names = tuple(f.lora_file_names for f in families.FAMILIES if f.lora_file_names is not None)
    return lora_formats.load_lora(path_or_state_dict, params, strict, names)


def _patterns(targets):
    if isinstance(targets, str):  # a preset: a family's official targets, or "<family>-all"
        return families.lora_preset(targets)
    return tuple(targets)


# ---- building trees ----

@functools.partial(jax.jit, static_argnums=(1, 2))
def _gaussians(key, shapes, rank):
    """N(0, (1/rank)^2) arrays of `shapes`, cut from one draw: one small compiled program per LoRA layout."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32) / rank
    return [x.reshape(shape) for x, shape in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), shapes)]


def init_lora(key, params, targets, rank, alpha, dtype=jnp.float32):
    """A new LoRA on every Dense layer whose diffusers name matches `targets` (a preset name or patterns).

    Initialised as PEFT's `init_lora_weights="gaussian"`: A ~ N(0, (1/r)^2), B = 0, so the adapted model
    starts equal to the base.
    """
    if isinstance(rank, bool) or not float(rank).is_integer() or rank < 1:
        raise GlanceError(f"LoRA rank {rank!r}: must be a positive integer")
    rank = int(rank)
    if not np.isfinite(alpha) or alpha <= 0:
        raise GlanceError(f"LoRA alpha {alpha!r}: must be a finite number > 0 (the scale is alpha / rank)")
    patterns = _patterns(targets)
    chosen = collections.defaultdict(set)
    for name, (path, index, _) in dense_layers(params).items():
        if matches(name, patterns):
            chosen[path].add(index)
    if not chosen:
        raise GlanceError(f"no Dense layer matches the LoRA targets {targets!r}")
    flat = flatten_dict(params)
    paths = sorted(chosen)
    shapes = tuple(flat[path + ("kernel",)].shape[:-1] + (rank,) for path in paths)
    tree = {}
    for path, a in zip(paths, _gaussians(key, shapes, rank)):
        shape = flat[path + ("kernel",)].shape
        stack, fan_out = shape[:-2], shape[-1]
        mask = np.ones(stack, np.float32)
        if stack:
            mask[:] = 0
            mask[sorted(chosen[path])] = 1
        tree[path + ("A",)] = (a if mask.all() else a * mask[..., None, None]).astype(dtype)
        tree[path + ("B",)] = jnp.zeros((*stack, rank, fan_out), dtype)
        tree[path + ("alpha",)] = jnp.asarray(alpha * mask, jnp.float32)
    return unflatten_dict(tree)
