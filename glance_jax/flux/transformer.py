"""FLUX.1 transformer (diffusers' `FluxTransformer2DModel`) in Flax.

Read top to bottom: the conditioning embedding, the double-stream block
(separate image and text weights, joint attention), the single-stream block
(one weight set over the concatenated sequence), then the model that scans
over each stack of blocks. The pieces Qwen-Image shares (rotary embedding,
attention, feed-forward, output layer, block stack) are in `layers.py`.

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
import numpy as np

from glance_jax import layout
from glance_jax.flux import bfl
from glance_jax.modules.base import PretrainedModel
from glance_jax.modules.layers import (
    Dense,
    DoubleStreamAttention,
    EmbedND,
    FeedForward,
    MLPEmbedder,
    block_stack,
    gelu_tanh,
    joint_attention,
    layer_norm,
    modulate,
    output_layer,
    project_qkv,
    timestep_sinusoid,
)

Dtype = Any


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
        elif guidance is not None and self.has_variable("lora", "glance_guidance_embedder"):
            # a guidance embedding trained beside a LoRA for a model that has none (FLUX.1-dev's shape)
            e = self.get_variable("lora", "glance_guidance_embedder")
            dense = lambda x, layer: jnp.dot(x, e[layer]["kernel"]) + e[layer]["bias"]
            x = timestep_sinusoid(guidance * 1000)
            temb = temb + dense(jax.nn.silu(dense(x, "linear_1")), "linear_2").astype(temb.dtype)
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


class FluxTransformer2DModel(PretrainedModel, nn.Module):
    """The FLUX.1 MMDiT. Fields are diffusers' config keys, plus the compute dtype and the remat policy.

    `apply({"params": params}, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
    txt_ids, guidance=None)` returns the velocity for packed latent tokens, exactly as diffusers'
    `forward(..., return_dict=False)[0]`: timestep (and guidance) in [0, 1] per sample, 2-D ids.
    `reference_hidden_states` (FLUX.1 Kontext's packed reference image tokens) are appended to the image
    tokens and cut from the output again, as diffusers' FluxKontextPipeline does around the model; `img_ids`
    then holds the ids of both.
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
    attention_impl: str = "auto"  # "auto", "xla", "blocked", "splash" or "cudnn" (see modules.attention)
    scan_unroll: bool = False  # unrolled blocks: slower to compile, but XLA's cost analysis counts every block

    quantizable = True  # a frozen base whose Dense kernels glance_jax.quantize may store in 8 bits
    required_config_keys = ("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                            "num_attention_heads", "joint_attention_dim", "pooled_projection_dim")
    single_file_layout = bfl  # Black Forest Labs' own checkpoint files load too
    config_keys = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                   "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                   "guidance_embeds", "axes_dims_rope")

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None, reference_hidden_states=None):
        dim = self.num_attention_heads * self.attention_head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.guidance_embeds and guidance is None:
            raise ValueError("this FLUX model has a guidance embedding (FLUX.1-dev): pass `guidance`")

        tokens = hidden_states.shape[1]
        if reference_hidden_states is not None:
            hidden_states = jnp.concatenate([hidden_states, reference_hidden_states.astype(hidden_states.dtype)], 1)
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
        img = carry[0][:, :tokens]  # the output layer works token by token: the reference tokens need none of it

        out_channels = self.out_channels or self.in_channels
        return output_layer(img, temb, self.patch_size ** 2 * out_channels, kw)

    def conditioning(self, encodings, rows, cols, guidance=1.0):
        """(keyword inputs, static inputs) besides hidden_states and timestep, for a batch of prompt encodings
        (`prompt_embeds` (B, T, D), `pooled_prompt_embeds` (B, P)) and a rows x cols grid of packed latents.

        The one place FLUX's inputs are assembled (sampler, trainer, planner): position ids (0, row,
        column) for the image and zeros for the text, and the guidance input if the model has one. With
        `image_latents` (FLUX.1 Kontext: a tuple of (B, h, w, C) VAE latents of reference images), their packed
        tokens follow the image's, with ids (1, row, column), as diffusers' FluxKontextPipeline gives them."""
        embeds = encodings["prompt_embeds"]
        batch, text_tokens = embeds.shape[:2]
        ids = [image_ids(rows, cols)]
        references = [layout.pack_latents(jnp.asarray(r, self.dtype)) for r in encodings.get("image_latents", ())]
        for r in encodings.get("image_latents", ()):
            ids.append(image_ids(r.shape[1] // layout.PATCH, r.shape[2] // layout.PATCH, index=1))
        cond = dict(encoder_hidden_states=jnp.asarray(embeds, self.dtype),
                    pooled_projections=jnp.asarray(encodings["pooled_prompt_embeds"], self.dtype),
                    img_ids=jnp.asarray(np.concatenate(ids)), txt_ids=jnp.zeros((text_tokens, 3), jnp.float32),
                    guidance=jnp.full((batch,), guidance, jnp.float32) if self.guidance_embeds else None)
        if references:
            cond["reference_hidden_states"] = jnp.concatenate(references, axis=1)
        return cond, ()

    def example_inputs(self, batch=1, image_tokens=1, text_tokens=1):
        """Zero inputs of the right shapes: enough to initialise or trace the model."""
        zeros = lambda *s: jnp.zeros(s, jnp.float32)
        cond, _ = self.conditioning({"prompt_embeds": zeros(batch, text_tokens, self.joint_attention_dim),
                                     "pooled_prompt_embeds": zeros(batch, self.pooled_projection_dim)},
                                    image_tokens, 1, guidance=0.0)
        return dict(hidden_states=zeros(batch, image_tokens, self.in_channels), timestep=zeros(batch), **cond)


def image_ids(rows, cols, index=0):
    """FLUX position ids of a rows x cols grid of packed tokens: (index, row, column); Kontext's references: 1."""
    ids = np.full((rows, cols, 3), index, np.float32)
    ids[..., 1] = np.arange(rows)[:, None]
    ids[..., 2] = np.arange(cols)[None, :]
    return ids.reshape(-1, 3)
