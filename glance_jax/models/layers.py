"""Building blocks shared by the MMDiT ports: LoRA-aware Dense, norms, RoPE, attention.

Numerics follow diffusers where it matters for parity: norms and the rotary
embedding are computed in float32 and cast back, attention softmax runs in
float32, and the timestep embedding is the sinusoidal one of diffusers'
`Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax import quantize

Dtype = Any

# Top-level parameter names that hold a stack of blocks (leading axis = block index), in every model.
STACKED_BLOCKS = ("transformer_blocks", "single_transformer_blocks")

# Remat (gradient checkpointing) policies for the scanned blocks, by name.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


class Dense(nn.Module):
    """`y = x W + b`, plus `(alpha / r) (x A) B` when a LoRA for this layer is in the `lora` collection.

    The kernel is stored (in, out), the transpose of torch's Linear weight. The
    LoRA branch runs in the LoRA's own dtype (float32 when training) so that
    small updates are not rounded away by a bfloat16 base. A quantized base
    (glance_jax.quantize) stores an 8-bit kernel with a `kernel_scale` leaf
    (one scale per output channel) beside it; the layer then computes `(x q) scale`.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                            self.param_dtype)
        if self.has_variable("params", quantize.SCALE):
            y = quantize.quantized_dot(x, kernel, self.get_variable("params", quantize.SCALE), self.dtype)
        else:
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        if self.has_variable("lora", "A"):
            a, b = self.get_variable("lora", "A"), self.get_variable("lora", "B")
            scale = self.get_variable("lora", "alpha") / a.shape[-1]
            lora_dtype = jnp.promote_types(a.dtype, self.dtype)
            delta = jnp.dot(jnp.dot(x.astype(lora_dtype), a.astype(lora_dtype)), b.astype(lora_dtype))
            y = y + (scale * delta).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm with a learned scale (diffusers' `norm_q`, `norm_k`, ...)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def layer_norm(x, eps=1e-6):
    """LayerNorm without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
    """`x * (1 + scale) + shift` with per-sample (B, D) modulation broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def timestep_sinusoid(t, dim=256, max_period=10000.0):
    """diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    """`linear_2(silu(linear_1(x)))`: diffusers' TimestepEmbedding and PixArtAlphaTextProjection(silu)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return dense("linear_2")(jax.nn.silu(dense("linear_1")(x)))


def rope_frequencies(axes_dim, theta=10000.0):
    """Per-axis inverse frequencies theta^(-2k/d), computed in float64 as diffusers does, stored as float32."""
    return [np.float32(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)) for d in axes_dim]


def rope_angles(ids, axes_dim, theta=10000.0):
    """Rotation angles (S, head_dim / 2) for position ids (S, n_axes), one block of frequencies per axis."""
    ids = ids.astype(jnp.float32)
    return jnp.concatenate(
        [ids[:, i:i + 1] * freqs[None, :] for i, freqs in enumerate(rope_frequencies(axes_dim, theta))], axis=-1)


def apply_rope(x, cos, sin):
    """Rotates consecutive channel pairs of x (B, S, heads, head_dim) by angles given as cos/sin (S, head_dim / 2)."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x_re, x_im = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x_re * c - x_im * s, x_im * c + x_re * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention(q, k, v, mask=None, implementation="auto"):
    """Scaled dot-product attention on (B, S, heads, head_dim); softmax in float32; mask is (B, S_kv), True = attend.

    `implementation`: "xla" is `jax.nn.dot_product_attention` (XLA picks or
    fuses the kernel; the choice on accelerators). "blocked" processes queries
    in blocks whose logits stay around 16 MB: on CPU, XLA's version
    materialises all (B, heads, S, S) logits and runs 3-5x slower than
    PyTorch's blocked kernel. "auto" is "blocked" on CPU, "xla" elsewhere.
    """
    if implementation == "auto":
        implementation = "blocked" if jax.default_backend() == "cpu" else "xla"
    if implementation == "blocked":
        return blocked_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])


def blocked_attention(q, k, v, mask=None, block_bytes=16 * 2 ** 20):
    """Exact attention computed one block of queries at a time (same math as `jax.nn.dot_product_attention`)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q = q.transpose(0, 2, 1, 3) * jnp.asarray(head_dim ** -0.5, q.dtype)  # (B, N, T, H)
    k_t = k.transpose(0, 2, 3, 1)  # (B, N, H, S)
    v = v.transpose(0, 2, 1, 3)  # (B, N, S, H)
    bias = None if mask is None else jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    def block(q_block):
        logits = jnp.matmul(q_block, k_t, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.matmul(probs, v)

    n_blocks = -(-4 * batch * heads * kv_len * q_len // block_bytes)
    if n_blocks <= 1:
        out = block(q)
    else:
        rows = -(-q_len // n_blocks)
        q = jnp.pad(q, ((0, 0), (0, 0), (0, n_blocks * rows - q_len), (0, 0)))
        q = q.reshape(batch, heads, n_blocks, rows, head_dim).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(block, q).transpose(1, 2, 0, 3, 4).reshape(batch, heads, -1, head_dim)[:, :, :q_len]
    return out.transpose(0, 2, 1, 3)
