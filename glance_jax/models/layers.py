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
from glance_jax.models import attention as attention_kernels

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

    `implementation`: "xla", "blocked" (CPU), "splash" (TPU), "cudnn" (GPU) or
    "auto" (by platform); the kernels are in `glance_jax.models.attention`.
    """
    return attention_kernels.attention(q, k, v, mask, implementation)
