"""Weight-only 8-bit frozen bases: fp8 (float8 e4m3fn) and int8 kernels with one scale per output channel.

What optimum-quanto's `quantize(model, weights=qfloat8 | qint8); freeze(model)` does, and what the official
Glance training runs on: every Linear layer of the transformer keeps its weight as 8-bit values `q` and one
scale per output channel, `scale = max |W[:, j]| / qmax` (qmax 448 for float8 e4m3fn, 127 for int8),
`q = clip(W / scale, -qmax', qmax)` cast to the 8-bit type (int8 rounds to the nearest integer first).
Activations, biases, norms and everything that is not a Linear weight stay in the compute dtype.

Here a quantized Dense is nothing but data: its `kernel` leaf holds the 8-bit values, (in, out) as
always, and a `kernel_scale` leaf (out,) sits beside it (stacked blocks: (L, in, out) and (L, out)).
`Dense` sees the scale and computes `(x q) * scale` (see `quantized_dot`): the dot consumes the
8-bit kernel (the cast to the compute dtype is fused into the dot's operand by XLA), the per-channel
scale is applied to the dot's output, so no full-precision copy of a kernel is ever built. LoRAs
apply unmerged on top; a quantized kernel is never merged into.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from glance_jax.errors import GlanceError

# name -> (storage dtype, qmax): the largest representable magnitude, what absmax is mapped to.
KINDS = {"fp8": (jnp.float8_e4m3fn, 448.0), "int8": (jnp.int8, 127.0)}
SCALE = "kernel_scale"  # the leaf name of the per-output-channel scales, beside `kernel`
SCALE_DTYPE = np.float32


def check_kind(kind):
    """None / "none" -> None; "fp8" / "int8" -> itself; anything else is a GlanceError."""
    if kind in (None, "none", ""):
        return None
    if kind not in KINDS:
        raise GlanceError(f"unknown quantization {kind!r}: use one of none, {', '.join(KINDS)}")
    return kind


def storage_dtype(kind):
    return jnp.dtype(KINDS[kind][0])


def quantize_rows(rows, kind):
    """torch-layout weight rows (out, in), one output channel each -> (8-bit values (out, in), scales (out,)).

    quanto's absmax rule in float32: scale = max |row| / qmax; values = clip(row / scale) (rounded for int8).
    A row of zeros gets scale 0 and values 0 (quanto would divide by zero there).
    """
    dtype, qmax = KINDS[kind]
    rows = np.asarray(rows, np.float32)
    scale = (np.max(np.abs(rows), axis=-1) / np.float32(qmax)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    values = rows / safe[..., None]
    if kind == "int8":
        values = np.round(values)
    info = jnp.iinfo(jnp.int8) if kind == "int8" else jnp.finfo(jnp.float8_e4m3fn)
    values = np.clip(values, np.float32(info.min), np.float32(info.max))
    return values.astype(dtype), scale


def quantize_kernel(kernel, kind):
    """A Flax kernel (..., in, out) -> (8-bit kernel (..., in, out), scales (..., out)), on the host."""
    kernel = np.asarray(kernel)
    rows = np.swapaxes(kernel, -1, -2)  # (..., out, in): one output channel a row, as torch stores it
    values, scale = quantize_rows(rows, kind)
    return np.swapaxes(values, -1, -2), scale


def _dot(x, kernel, scale, dtype):
    return jnp.dot(x.astype(dtype), kernel.astype(dtype)) * scale.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def quantized_dot(x, kernel, scale, dtype):
    """`x @ (q * scale)` computed as `(x @ q) * scale`: the 8-bit kernel feeds the dot; scales hit its output.

    The gradient flows to `x` only (the base is frozen) and keeps the 8-bit kernel as its residual:
    left to itself, autodiff would keep each dot's converted (compute-dtype) kernel for the backward
    pass, a full-precision copy of the base when the blocks are not rematerialised.
    """
    return _dot(x, kernel, scale, dtype)


def _dot_forward(x, kernel, scale, dtype):
    return _dot(x, kernel, scale, dtype), (kernel, scale, jnp.zeros((0,), x.dtype))


def _dot_backward(dtype, residuals, g):
    kernel, scale, x_like = residuals
    g = g * scale.astype(g.dtype)
    dx = jnp.dot(g, kernel.astype(g.dtype).T).astype(x_like.dtype)
    no_gradient = lambda a: (np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating)
                             else jnp.zeros_like(a))
    return dx, no_gradient(kernel), no_gradient(scale)


quantized_dot.defvjp(_dot_forward, _dot_backward)


# ---- parameter trees ----

def is_dense_kernel(path, leaf):
    """Dense kernels are `kernel` leaves of rank 2, or 3 when stacked; conv kernels (rank 4-5) are not."""
    return path[-1] == "kernel" and len(leaf.shape) in (2, 3)


def kind_of(params):
    """"fp8", "int8" or None: how a parameter tree's Dense kernels are stored."""
    flat = flatten_dict(params)
    for path in flat:
        if path[-1] == SCALE:
            kernel = flat[path[:-1] + ("kernel",)]
            return next(k for k in KINDS if jnp.dtype(kernel.dtype) == storage_dtype(k))
    return None


def is_quantized(params):
    return any(path[-1] == SCALE for path in flatten_dict(params))


def abstract(params, kind):
    """ShapeDtypeStructs of the quantized tree for an (abstract) float tree: what the planner compiles with."""
    flat = {}
    for path, leaf in flatten_dict(params).items():
        if is_dense_kernel(path, leaf):
            flat[path] = jax.ShapeDtypeStruct(leaf.shape, storage_dtype(kind))
            flat[path[:-1] + (SCALE,)] = jax.ShapeDtypeStruct(leaf.shape[:-2] + leaf.shape[-1:], SCALE_DTYPE)
        else:
            flat[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    return unflatten_dict(flat)


def _quantize_on_device(kind):
    dtype, qmax = KINDS[kind]

    def run(kernel):
        w = kernel.astype(jnp.float32)
        scale = jnp.max(jnp.abs(w), axis=-2) / jnp.float32(qmax)
        values = w / jnp.where(scale == 0, 1.0, scale)[..., None, :]
        if kind == "int8":
            values = jnp.round(values)
        info = jnp.iinfo(jnp.int8) if kind == "int8" else jnp.finfo(jnp.float8_e4m3fn)
        return jnp.clip(values, float(info.min), float(info.max)).astype(dtype), scale

    return jax.jit(run)


def quantize_params(params, kind):
    """Quantizes every Dense kernel of a float parameter tree, one kernel at a time, deleting each float kernel.

    The `params` passed in must not be used again (their kernels are freed as they are replaced).
    For bases already in memory (e.g. a pipeline built from float params); loading with
    `from_pretrained(..., quantize=kind)` quantizes while reading and never holds the float base at all.
    """
    kind = check_kind(kind)
    if kind is None:
        return params
    if is_quantized(params):
        raise GlanceError(f"the parameters are already quantized ({kind_of(params)})")
    run = _quantize_on_device(kind)
    flat = flatten_dict(params)
    for path in [p for p, leaf in flat.items() if is_dense_kernel(p, leaf)]:
        kernel = flat.pop(path)
        if isinstance(kernel, np.ndarray):
            flat[path], flat[path[:-1] + (SCALE,)] = (jnp.asarray(a) for a in quantize_kernel(kernel, kind))
        else:
            flat[path], flat[path[:-1] + (SCALE,)] = run(kernel)
            kernel.delete()  # an 8-bit output cannot reuse the float buffer (no donation): free it now
    return unflatten_dict(flat)


def refuse_merge(params):
    """Merging a LoRA into 8-bit kernels would re-round the base: refused with the way out."""
    if is_quantized(params):
        raise GlanceError(f"cannot merge a LoRA into a quantized ({kind_of(params)}) base: apply it unmerged "
                          "(model.apply({'params': base, 'lora': tree}), or the pipelines' lora_mode='unmerged')")
