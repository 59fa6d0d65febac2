"""FLUX.1 transformer (diffusers' `FluxTransformer2DModel`) in Flax.

Read top to bottom: the rotary embedding, the conditioning embedding, the
double-stream block (separate image and text weights, joint attention), the
single-stream block (one weight set over the concatenated sequence), then the
model that scans over each stack of blocks.

Module and parameter names are diffusers' module names (`to_q`, `add_q_proj`,
`to_out.0`, `ff.net.0.proj`, `norm1.linear`, ...), so a parameter path joined
with dots, with the block index put back after the stack's name, is the
diffusers key (see `glance_jax.checkpoints`). Kernels are (in, out), the
transpose of torch's Linear weights. Blocks of one kind are stacked on a
leading axis and run with `nn.scan`, so compile time does not grow with depth.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glance_jax.models.base import PretrainedModel
from glance_jax.models.layers import (
    REMAT_POLICIES,
    Dense,
    MLPEmbedder,
    RMSNorm,
    apply_rope,
    attention,
    gelu_tanh,
    layer_norm,
    modulate,
    rope_angles,
    timestep_sinusoid,
)

Dtype = Any


class EmbedND(nn.Module):
    """3-axis RoPE: angles from (S, 3) position ids, returned as cos and sin of shape (S, head_dim / 2)."""

    axes_dim: Sequence[int]
    theta: float = 10000.0

    def __call__(self, ids):
        angles = rope_angles(ids, self.axes_dim, self.theta)
        return jnp.cos(angles), jnp.sin(angles)


class TimeTextEmbedding(nn.Module):
    """`time_text_embed`: timestep (+ guidance) sinusoids and the pooled text vector, summed into one (B, D) vector."""

    dim: int
    guidance_embeds: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, timestep, guidance, pooled):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        temb = MLPEmbedder(self.dim, **kw, name="timestep_embedder")(timestep_sinusoid(timestep * 1000))
        if self.guidance_embeds:
            temb = temb + MLPEmbedder(self.dim, **kw, name="guidance_embedder")(timestep_sinusoid(guidance * 1000))
        return temb + MLPEmbedder(self.dim, **kw, name="text_embedder")(pooled)


class AdaLayerNormZero(nn.Module):
    """`norm1`: modulation vector -> (normed x, the remaining shift/scale/gate chunks).

    `chunks` is 6 in double blocks (shift, scale, gate for attention, then for
    the MLP) and 3 in single blocks (diffusers' AdaLayerNormZeroSingle).
    """

    dim: int
    chunks: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, temb):
        emb = Dense(self.chunks * self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="linear")(jax.nn.silu(temb))
        shift, scale, *rest = jnp.split(emb, self.chunks, axis=-1)
        return modulate(layer_norm(x), shift, scale), rest


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


class DoubleStreamBlock(nn.Module):
    """diffusers' FluxTransformerBlock: image and text streams with their own weights, joint attention."""

    dim: int
    heads: int
    head_dim: int
    attention_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, carry, temb, cos, sin):
        img, txt = carry
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_img, (img_gate, img_shift_mlp, img_scale_mlp, img_gate_mlp) = AdaLayerNormZero(
            self.dim, 6, **kw, name="norm1")(img, temb)
        norm_txt, (txt_gate, txt_shift_mlp, txt_scale_mlp, txt_gate_mlp) = AdaLayerNormZero(
            self.dim, 6, **kw, name="norm1_context")(txt, temb)

        img_attn, txt_attn = DoubleStreamAttention(self.heads, self.head_dim, self.attention_impl, **kw, name="attn")(
            norm_img, norm_txt, cos, sin)

        img = img + img_gate[:, None] * img_attn
        img_ff = FeedForward(self.dim, **kw, name="ff")(modulate(layer_norm(img), img_shift_mlp, img_scale_mlp))
        img = img + img_gate_mlp[:, None] * img_ff

        txt = txt + txt_gate[:, None] * txt_attn
        txt_ff = FeedForward(self.dim, **kw, name="ff_context")(
            modulate(layer_norm(txt), txt_shift_mlp, txt_scale_mlp))
        txt = txt + txt_gate_mlp[:, None] * txt_ff
        return (img, txt), None


class SingleStreamAttention(nn.Module):
    """`attn` of a single block: q/k/v over the joint sequence and no output projection (`proj_out` follows)."""

    heads: int
    head_dim: int
    attention_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, cos, sin):
        q, k, v = project_qkv(x, self.heads, self.head_dim, ("to_q", "to_k", "to_v", "norm_q", "norm_k"),
                              dict(dtype=self.dtype, param_dtype=self.param_dtype))
        return joint_attention(q, k, v, cos, sin, self.attention_impl)


class SingleStreamBlock(nn.Module):
    """diffusers' FluxSingleTransformerBlock: attention and a 4x MLP in parallel on [text, image]."""

    dim: int
    heads: int
    head_dim: int
    attention_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, carry, temb, cos, sin):
        img, txt = carry
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.concatenate([txt, img], axis=1)
        norm_x, (gate,) = AdaLayerNormZero(self.dim, 3, **kw, name="norm")(x, temb)
        mlp = gelu_tanh(Dense(4 * self.dim, **kw, name="proj_mlp")(norm_x))
        attn = SingleStreamAttention(self.heads, self.head_dim, self.attention_impl, **kw, name="attn")(
            norm_x, cos, sin)
        x = x + gate[:, None] * Dense(self.dim, **kw, name="proj_out")(jnp.concatenate([attn, mlp], axis=-1))
        return (x[:, txt.shape[1]:], x[:, :txt.shape[1]]), None


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


class FluxTransformer2DModel(PretrainedModel, nn.Module):
    """The FLUX.1 MMDiT. Fields are diffusers' config keys, plus the compute dtype and the remat policy.

    `apply({"params": params}, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
    txt_ids, guidance=None)` returns the velocity for packed latent tokens, exactly as diffusers'
    `forward(..., return_dict=False)[0]`: timestep (and guidance) in [0, 1] per sample, 2-D ids.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: Sequence[int] = (16, 56, 56)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str = "auto"  # "auto", "xla", "blocked", "splash" or "cudnn" (see models.attention)
    scan_unroll: bool = False  # unrolled blocks: slower to compile, but XLA's cost analysis counts every block

    config_keys = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                   "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                   "guidance_embeds", "axes_dims_rope")

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        dim = self.num_attention_heads * self.attention_head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.guidance_embeds and guidance is None:
            raise ValueError("this FLUX model has a guidance embedding (FLUX.1-dev): pass `guidance`")

        img = Dense(dim, **kw, name="x_embedder")(hidden_states)
        txt = Dense(dim, **kw, name="context_embedder")(encoder_hidden_states)
        temb = TimeTextEmbedding(dim, self.guidance_embeds, **kw, name="time_text_embed")(
            timestep, guidance, pooled_projections)
        cos, sin = EmbedND(self.axes_dims_rope)(jnp.concatenate([txt_ids, img_ids], axis=0))

        blocks = dict(dim=dim, heads=self.num_attention_heads, head_dim=self.attention_head_dim,
                      attention_impl=self.attention_impl, **kw)
        carry = (img, txt)
        if self.num_layers:
            carry, _ = block_stack(DoubleStreamBlock, self.num_layers, self.remat_policy, self.scan_unroll)(
                **blocks, name="transformer_blocks")(carry, temb, cos, sin)
        if self.num_single_layers:
            carry, _ = block_stack(SingleStreamBlock, self.num_single_layers, self.remat_policy, self.scan_unroll)(
                **blocks, name="single_transformer_blocks")(carry, temb, cos, sin)
        img = carry[0]

        out_channels = self.out_channels or self.in_channels
        return output_layer(img, temb, self.patch_size ** 2 * out_channels, kw)

    def example_inputs(self, batch=1, image_tokens=1, text_tokens=1):
        """Zero inputs of the right shapes: enough to initialise or trace the model."""
        zeros = lambda *s: jnp.zeros(s, jnp.float32)
        return dict(hidden_states=zeros(batch, image_tokens, self.in_channels),
                    encoder_hidden_states=zeros(batch, text_tokens, self.joint_attention_dim),
                    pooled_projections=zeros(batch, self.pooled_projection_dim), timestep=zeros(batch),
                    img_ids=zeros(image_tokens, 3), txt_ids=zeros(text_tokens, 3),
                    guidance=zeros(batch) if self.guidance_embeds else None)
