"""LoRA trees: their layout, merging and unmerging, pure functions of arrays (no names, no files).

A LoRA tree mirrors the base parameter tree down to the targeted Dense
layers: `tree["transformer_blocks"]["attn"]["to_q"] = {"A": (L, in, r),
"B": (r, out) stacked to (L, r, out), "alpha": (L,)}`, stacked like the
blocks it adapts. Blocks a LoRA does not touch have A = B = 0 and alpha = 0.

Two ways to use one:
- unmerged, for training: `model.apply({"params": base, "lora": tree}, ...)`
  computes `x W + b + (alpha / r) (x A) B` (see `layers.Dense`);
- merged, for inference: `merge_lora(params, tree)` adds `(alpha / r) A B`
  to each kernel, in place on donated buffers, so sampling costs exactly
  what the base costs and no second copy of the base is ever held.

Building a tree for diffusers module names is `glance_jax.lora.init_lora`; files are `lora_formats`.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from glance_jax.errors import GlanceError
from glance_jax.quantize import refuse_merge

# A trained guidance embedding (train: config.student.guidance_input) rides in a LoRA tree as a module of this name,
# where its family puts it (apart from a LoRA on FLUX.1-dev's own guidance_embedder), in the shape of FLUX.1-dev's
# guidance embedder ({"linear_1", "linear_2"}: {"kernel", "bias"}); files hold it under this prefix and those layer
# names (torch layout), which diffusers and other tools ignore.
GUIDANCE_EMBEDDER = "glance_guidance_embedder"


def _embedder_path(tree):
    """The path of the guidance embedder in a LoRA tree, or None."""
    for path in flatten_dict(tree):
        if GUIDANCE_EMBEDDER in path:
            return path[:path.index(GUIDANCE_EMBEDDER) + 1]
    return None


def modules_of(tree):
    """{module path: {"A", "B", "alpha"}} of a LoRA tree (its guidance embedder, if any, is not a LoRA module)."""
    modules = collections.defaultdict(dict)
    for path, leaf in flatten_dict(tree).items():
        if GUIDANCE_EMBEDDER not in path:
            modules[path[:-1]][path[-1]] = leaf
    return modules


def guidance_embedder(tree):
    """The trained guidance embedding a LoRA tree carries ({"linear_1", "linear_2"}: {"kernel", "bias"}), or None."""
    path = _embedder_path(tree)
    if path is None:
        return None
    for key in path:
        tree = tree[key]
    return tree


def guidance_embedder_alone(tree):
    """The LoRA tree of the guidance embedder alone, at its place (a layer the model runs, never merged)."""
    path = _embedder_path(tree)
    node = guidance_embedder(tree)
    for key in reversed(path):
        node = {key: node}
    return node


def new_guidance_embedder(key, width):
    """A trainable guidance embedding for a model of `width`: FLUX.1-dev's guidance embedder's shape (the scale's
    256 sinusoids -> linear_1 -> silu -> linear_2, added to the conditioning vector), linear_1 drawn as
    lecun-normal, linear_2 zero, so it starts by adding nothing."""
    return {"linear_1": {"kernel": jax.random.normal(key, (256, width), jnp.float32) / np.sqrt(256),
                         "bias": jnp.zeros((width,), jnp.float32)},
            "linear_2": {"kernel": jnp.zeros((width, width), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}}


def with_guidance_embedder(tree, at, embedder):
    """A copy of `tree` with `embedder` as its guidance embedding, in the module at path `at` (its family's place;
    dicts along the path copied, the rest shared)."""
    def put(node, path):
        if not path:
            return {**node, GUIDANCE_EMBEDDER: embedder}
        return {**node, path[0]: put(node.get(path[0], {}), path[1:])}
    return put(tree, tuple(at))


# ---- merging ----

def check_shapes(params, tree):
    """Raises one GlanceError naming the first layer whose LoRA does not fit the model, with both shapes.

    Works on arrays and on abstract shapes (also inside a trace), so the merged and the unmerged paths
    both check before any compute.
    """
    flat = flatten_dict(params)
    modules = modules_of(tree)
    missing = [".".join(p) for p in modules if p + ("kernel",) not in flat]
    if missing:
        raise GlanceError(f"LoRA modules not in the model: {', '.join(missing[:6])}")
    for path, m in modules.items():
        if not {"A", "B", "alpha"} <= set(m):
            raise GlanceError(f"LoRA layer {'.'.join(path)}: needs A, B and alpha, has {', '.join(sorted(m))}")
        kernel, a, b, alpha = flat[path + ("kernel",)].shape, m["A"].shape, m["B"].shape, m["alpha"].shape
        fits = (len(a) == len(kernel) and len(b) == len(kernel) and a[:-2] == kernel[:-2] == b[:-2]
                and a[-2] == kernel[-2] and b[-1] == kernel[-1] and a[-1] == b[-2] and tuple(alpha) == kernel[:-2])
        if not fits:
            raise GlanceError(f"LoRA layer {'.'.join(path)}: A {tuple(a)} and B {tuple(b)} (alpha {tuple(alpha)}) "
                              f"do not fit the model's kernel {tuple(kernel)}")


def _check_scale(scale):
    if isinstance(scale, (int, float, np.number)) and not np.isfinite(scale):
        raise GlanceError(f"LoRA scale {scale!r}: must be a finite number")


# A merge may change a kernel by at most this many times its largest weight: then merge + unmerge
# restores every kernel within (1 + MAX_CHANGE) * eps(kernel dtype) * max|W| (one rounding of each sum).
# A larger change (a LoRA scaled by 1e8) would leave the base visibly off after unmerging.
MAX_CHANGE = 64.0


@functools.partial(jax.jit, static_argnums=3)
def _merge_report(params, tree, scale, merge):
    """Per adapted layer (sorted): (tree finite, merged kernel finite, max|change| <= MAX_CHANGE max|W|);
    without `merge` only the first is computed (the others are True)."""
    flat, out = flatten_dict(params), []
    for path, m in sorted(modules_of(tree).items()):
        a, b, alpha = (m[k].astype(jnp.float32) for k in ("A", "B", "alpha"))
        tree_ok = jnp.isfinite(a).all() & jnp.isfinite(b).all() & jnp.isfinite(alpha).all()
        merged_ok = small = jnp.bool_(True)
        if merge:
            kernel = flat[path + ("kernel",)].astype(jnp.float32)
            delta = jnp.matmul(a, b) * (scale * alpha / a.shape[-1])[..., None, None]
            merged_ok = jnp.isfinite((kernel + delta).astype(flat[path + ("kernel",)].dtype)).all()
            biggest = jnp.max(jnp.abs(kernel))
            ratio = jnp.max(jnp.abs(delta)) / jnp.where(biggest > 0, biggest, jnp.finfo(jnp.float32).tiny)
            small = jnp.isfinite(ratio) & (ratio <= MAX_CHANGE)
        out.append(jnp.stack([tree_ok, merged_ok, small]))
    return jnp.stack(out)


def check_values(params, tree, scale=1.0, merge=True, name="LoRA"):
    """Refuses, before any sampling or merge, a LoRA holding NaN or inf, and (`merge`) one whose merge would
    make a kernel non-finite or change it by more than MAX_CHANGE times its largest weight (so that
    unmerging could not restore it); the base is not touched."""
    report = np.asarray(_merge_report(params, tree, jnp.float32(scale), bool(merge)))
    for path, (tree_ok, merged_ok, small) in zip(sorted(modules_of(tree)), report):
        layer = ".".join(path)
        if not tree_ok:
            raise GlanceError(f"{name}: layer {layer} holds NaN or infinite values; refused before any use")
        if not merged_ok:
            raise GlanceError(f"{name} at scale {scale:g}: merging would make layer {layer} non-finite; refused, "
                              "the base is unchanged")
        if not small:
            raise GlanceError(f"{name} at scale {scale:g}: merging would change layer {layer} by more than "
                              f"{MAX_CHANGE:g} times its largest weight, too much to unmerge exactly; refused (the "
                              "base is unchanged): lower the scale, or use lora_mode='unmerged'")


def merged_params(params, tree, scale=1.0):
    """params with `W + scale (alpha / r) A B` in each adapted kernel (fp32 math, W's dtype). Traceable.

    Only the adapted kernels are new arrays; every other leaf is `params`' own.
    """
    refuse_merge(params)
    check_shapes(params, tree)
    _check_scale(scale)
    flat = flatten_dict(params)
    modules = modules_of(tree)
    for path, m in modules.items():
        kernel = flat[path + ("kernel",)]
        a, b = m["A"].astype(jnp.float32), m["B"].astype(jnp.float32)
        factor = scale * m["alpha"].astype(jnp.float32) / a.shape[-1]
        delta = jnp.matmul(a, b) * jnp.asarray(factor)[..., None, None]
        flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)


_merge = jax.jit(merged_params)
_merge_in_place = jax.jit(merged_params, donate_argnums=0)


def merge_lora(params, tree, scale=1.0, donate=True):
    """params with `W + scale (alpha / r) A B` in every adapted kernel, computed in fp32, cast to W's dtype.

    With `donate=True` (the default) `params` is donated: the update happens
    in place and the `params` passed in must not be used again
    (`params = merge_lora(params, tree)`). Merge several LoRAs by calling it
    once for each; `merge_lora(params, tree, scale=-1.0)` (or `unmerge_lora`)
    takes one out again, to rounding.
    """
    refuse_merge(params)
    check_shapes(params, tree)  # before the buffers are donated: a bad LoRA leaves `params` intact
    _check_scale(scale)
    check_values(params, tree, scale)
    return (_merge_in_place if donate else _merge)(params, tree, jnp.float32(scale))


def unmerge_lora(params, tree, scale=1.0, donate=True):
    """Takes a merged LoRA back out: `merge_lora(params, tree, -scale)`."""
    return merge_lora(params, tree, -scale, donate)


