"""Building blocks shared by the models: LoRA-aware Dense, norms, RoPE, attention, and the MMDiT pieces that
FLUX.1 and Qwen-Image share (rotary embedding, joint attention, feed-forward, output layer, block stack).

Numerics follow diffusers where it matters for parity: norms and the rotary
embedding are computed in float32 and cast back, attention softmax runs in
float32, and the timestep embedding is the sinusoidal one of diffusers'
`Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax import quantize
from glance_jax.modules import attention as attention_kernels

Dtype = Any

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
    "auto" (by platform); the kernels are in `glance_jax.modules.attention`.
    """
    return attention_kernels.attention(q, k, v, mask, implementation)



def biased_attention(q, k, v, bias, scale):
    """Attention on (B, T, heads, d) with an additive (B or 1, heads or 1, T, S) bias, softmax in float32: the text
    encoders' (padding, causal and T5's relative-position biases), exact at their short lengths."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)

# ---- the MMDiT pieces FLUX.1 and Qwen-Image share ----

class EmbedND(nn.Module):
    """3-axis RoPE: angles from (S, 3) position ids, returned as cos and sin of shape (S, head_dim / 2)."""

    axes_dim: Sequence[int]
    theta: float = 10000.0

    def __call__(self, ids):
        angles = rope_angles(ids, self.axes_dim, self.theta)
        return jnp.cos(angles), jnp.sin(angles)


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate"): `net.2(gelu(net.0.proj(x)))`."""

    dim: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return Dense(self.dim, **kw, name="net.2")(gelu_tanh(Dense(4 * self.dim, **kw, name="net.0.proj")(x)))


def project_qkv(x, heads, head_dim, names, kw):
    """q, k, v projections and per-head RMSNorm of q and k: (B, S, D) -> three (B, S, heads, head_dim).

    Called inside a module's compact `__call__`, so the layers (named `names`:
    q, k, v projections, then q and k norms) become children of that module.
    """
    to_q, to_k, to_v, norm_q, norm_k = names
    split = lambda y: y.reshape(*y.shape[:-1], heads, head_dim)
    q, k, v = (split(Dense(heads * head_dim, **kw, name=n)(x)) for n in (to_q, to_k, to_v))
    return RMSNorm(1e-6, **kw, name=norm_q)(q), RMSNorm(1e-6, **kw, name=norm_k)(k), v


def joint_attention(q, k, v, cos, sin, implementation, mask=None):
    """RoPE on q and k, attention over the whole (text + image) sequence, heads merged back."""
    out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, implementation)
    return out.reshape(*out.shape[:2], -1)


class DoubleStreamAttention(nn.Module):
    """`attn` of a double block: separate q/k/v for image and text, one attention over both."""

    heads: int
    head_dim: int
    attention_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, img, txt, cos, sin, mask=None):
        """`mask` (B, text + image tokens), True = attend; None attends to everything (FLUX)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        img_names = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
        txt_names = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
        img_q, img_k, img_v = project_qkv(img, self.heads, self.head_dim, img_names, kw)
        txt_q, txt_k, txt_v = project_qkv(txt, self.heads, self.head_dim, txt_names, kw)
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        out = joint_attention(cat(txt_q, img_q), cat(txt_k, img_k), cat(txt_v, img_v), cos, sin,
                              self.attention_impl, mask)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        dim = img.shape[-1]
        return Dense(dim, **kw, name="to_out.0")(img_out), Dense(dim, **kw, name="to_add_out")(txt_out)


def output_layer(img, temb, features, kw):
    """`norm_out` (diffusers' AdaLayerNormContinuous: scale, then shift) and `proj_out`; FLUX and Qwen-Image alike.

    Called inside a model's compact `__call__`, so both layers become its children.
    """
    scale, shift = jnp.split(Dense(2 * img.shape[-1], **kw, name="norm_out.linear")(jax.nn.silu(temb)), 2, axis=-1)
    return Dense(features, **kw, name="proj_out")(modulate(layer_norm(img), shift, scale))


def block_stack(block_cls, length, remat_policy, unroll, broadcast_args=3):
    """`length` copies of `block_cls` with parameters (and LoRAs) stacked on axis 0, run by `nn.scan`.

    Blocks take (carry, *broadcast_args): the same conditioning for every block.
    """
    if remat_policy != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return nn.scan(block_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * broadcast_args, length=length, unroll=unroll)
