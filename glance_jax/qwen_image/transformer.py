"""Qwen-Image transformer (diffusers' `QwenImageTransformer2DModel`) in Flax.

Read top to bottom: the multi-scale RoPE position ids, the dual-stream block,
then the model. Qwen-Image is FLUX's double-stream design without single
blocks: 60 dual-stream blocks whose image and text streams have their own
modulation (`img_mod.1`, `txt_mod.1`), norms and MLPs (`img_mlp`, `txt_mlp`)
and meet in one joint attention (FLUX's `DoubleStreamAttention`, here with a
text padding mask). Text is RMS-normed (`txt_norm`) before `txt_in`.

Parameter names are diffusers' module names; blocks are stacked on a leading
axis and scanned, as in FLUX.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax import layout
from glance_jax.errors import GlanceError
from glance_jax.modules.base import PretrainedModel
from glance_jax.modules.layers import (
    Dense,
    DoubleStreamAttention,
    EmbedND,
    FeedForward,
    MLPEmbedder,
    RMSNorm,
    block_stack,
    layer_norm,
    modulate,
    output_layer,
    timestep_sinusoid,
)

Dtype = Any


def msrope_ids(img_shapes, text_len):
    """Position ids (text + image tokens, 3) of Qwen-Image's multi-scale RoPE, as diffusers' QwenEmbedRope.

    `img_shapes` holds, per sample, one (frames, h, w) grid or a list of them: the image's, then those of
    Qwen-Image-Edit's reference images. Grid k's tokens get (k + frame, row, column) with rows and columns
    centred on zero (scale_rope): rows -(h - h//2) ... h//2 - 1. Text token j gets (p, p, p) with
    p = max over the grids of (h//2, w//2), plus j. All samples must share their grids.
    """
    grids = [tuple(tuple(int(x) for x in g) for g in (s if s and isinstance(s[0], (list, tuple)) else [s]))
             for s in img_shapes]
    if len(set(grids)) != 1 or any(len(g) != 3 for g in grids[0]):
        raise GlanceError(f"img_shapes must be (frames, height, width) grids shared by the batch, got {img_shapes}")
    centred = lambda n: np.concatenate([np.arange(-(n - n // 2), 0), np.arange(n // 2)])
    ids = []
    for k, (frames, h, w) in enumerate(grids[0]):
        f_ids, h_ids, w_ids = np.meshgrid(k + np.arange(frames), centred(h), centred(w), indexing="ij")
        ids.append(np.stack([f_ids, h_ids, w_ids], axis=-1).reshape(-1, 3))
    start = max(max(h // 2, w // 2) for _, h, w in grids[0])
    txt = np.repeat((start + np.arange(text_len))[:, None], 3, axis=1)
    return np.concatenate([txt] + ids).astype(np.float32), sum(f * h * w for f, h, w in grids[0])


class DualStreamBlock(nn.Module):
    """diffusers' QwenImageTransformerBlock: per-stream modulation, norms and MLPs around a joint attention."""

    dim: int
    heads: int
    head_dim: int
    attention_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, carry, temb, cos, sin, mask):
        img, txt = carry
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Each stream's modulation: shift, scale, gate for the attention, then for the MLP.
        img_mod = jnp.split(Dense(6 * self.dim, **kw, name="img_mod.1")(jax.nn.silu(temb)), 6, axis=-1)
        txt_mod = jnp.split(Dense(6 * self.dim, **kw, name="txt_mod.1")(jax.nn.silu(temb)), 6, axis=-1)

        img_attn, txt_attn = DoubleStreamAttention(self.heads, self.head_dim, self.attention_impl, **kw,
                                                   name="attn")(
            modulate(layer_norm(img), img_mod[0], img_mod[1]), modulate(layer_norm(txt), txt_mod[0], txt_mod[1]),
            cos, sin, mask)
        img = img + img_mod[2][:, None] * img_attn
        txt = txt + txt_mod[2][:, None] * txt_attn

        img_mlp = FeedForward(self.dim, **kw, name="img_mlp")(modulate(layer_norm(img), img_mod[3], img_mod[4]))
        txt_mlp = FeedForward(self.dim, **kw, name="txt_mlp")(modulate(layer_norm(txt), txt_mod[3], txt_mod[4]))
        return (img + img_mod[5][:, None] * img_mlp, txt + txt_mod[5][:, None] * txt_mlp), None


class QwenImageTransformer2DModel(PretrainedModel, nn.Module):
    """The Qwen-Image MMDiT. Fields are diffusers' config keys, plus the compute dtype and the remat policy.

    `apply({"params": params}, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
    img_shapes)` returns what diffusers' `forward(..., return_dict=False)[0]` returns: packed latent
    tokens in, timestep in [0, 1], a text mask of 1 (real) / 0 (padding) in any pattern, and
    `img_shapes` as Python ints ((frames, h, w) in packed tokens per sample). Qwen-Image-Edit's packed
    reference latents come as `reference_hidden_states`: appended to the image tokens (their grids follow the
    image's in `img_shapes`) and cut from the output again, as diffusers' edit pipelines do around the model.
    """

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: Sequence[int] = (16, 56, 56)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str = "auto"
    scan_unroll: bool = False

    quantizable = True  # a frozen base whose Dense kernels glance_jax.quantize may store in 8 bits
    required_config_keys = ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                            "joint_attention_dim")
    config_keys = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                   "num_attention_heads", "joint_attention_dim", "guidance_embeds", "axes_dims_rope")
    unsupported = {"zero_cond_t": False, "use_additional_t_cond": False, "use_layer3d_rope": False,
                   "guidance_embeds": False}

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_shapes, encoder_hidden_states_mask=None,
                 reference_hidden_states=None):
        dim = self.num_attention_heads * self.attention_head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, text_len = encoder_hidden_states.shape[:2]
        tokens = hidden_states.shape[1]
        if reference_hidden_states is not None:
            hidden_states = jnp.concatenate([hidden_states, reference_hidden_states.astype(hidden_states.dtype)], 1)
        ids, image_tokens = msrope_ids(img_shapes, text_len)
        if image_tokens != hidden_states.shape[1]:
            raise GlanceError(f"img_shapes {img_shapes} give {image_tokens} tokens, hidden_states has "
                              f"{hidden_states.shape[1]}")

        img = Dense(dim, **kw, name="img_in")(hidden_states)
        txt = Dense(dim, **kw, name="txt_in")(RMSNorm(1e-6, **kw, name="txt_norm")(encoder_hidden_states))
        temb = MLPEmbedder(dim, **kw, name="time_text_embed.timestep_embedder")(timestep_sinusoid(timestep * 1000))
        cos, sin = EmbedND(self.axes_dims_rope)(jnp.asarray(ids))
        mask = None
        if encoder_hidden_states_mask is not None:
            mask = jnp.concatenate([jnp.asarray(encoder_hidden_states_mask).astype(bool),
                                    jnp.ones((batch, image_tokens), bool)], axis=1)

        blocks = dict(dim=dim, heads=self.num_attention_heads, head_dim=self.attention_head_dim,
                      attention_impl=self.attention_impl, **kw)
        stack = block_stack(DualStreamBlock, self.num_layers, self.remat_policy, self.scan_unroll, broadcast_args=4)
        (img, _), _ = stack(**blocks, name="transformer_blocks")((img, txt), temb, cos, sin, mask)

        return output_layer(img[:, :tokens], temb, self.patch_size ** 2 * self.out_channels, kw)

    def conditioning(self, encodings, rows, cols, guidance=None):
        """(keyword inputs, static inputs) besides hidden_states and timestep, for a batch of prompt encodings
        (`prompt_embeds` (B, T, D), optionally `prompt_embeds_mask` (B, T)) and a rows x cols grid of packed
        latents. The one place Qwen-Image's inputs are assembled; `img_shapes` (Python ints) shape the
        program. Qwen-Image has no guidance input: `guidance` is ignored. With `image_latents` (Qwen-Image-Edit:
        a tuple of (B, h, w, C) VAE latents of source images), their packed tokens follow the image's."""
        embeds = encodings["prompt_embeds"]
        mask = encodings.get("prompt_embeds_mask")
        references = [jnp.asarray(r, self.dtype) for r in encodings.get("image_latents", ())]
        grids = ((1, rows, cols),) + tuple((1, r.shape[1] // layout.PATCH, r.shape[2] // layout.PATCH)
                                           for r in references)
        cond = dict(encoder_hidden_states=jnp.asarray(embeds, self.dtype),
                    encoder_hidden_states_mask=None if mask is None else jnp.asarray(mask).astype(jnp.int32))
        if references:
            cond["reference_hidden_states"] = jnp.concatenate([layout.pack_latents(r) for r in references], axis=1)
        shapes = grids if references else grids[0]
        return cond, (("img_shapes", (shapes,) * embeds.shape[0]),)

    def example_inputs(self, batch=1, height=1, width=1, text_tokens=1):
        """Zero inputs for a (height, width) grid of packed tokens: enough to initialise or trace the model."""
        zeros = lambda *s: jnp.zeros(s, jnp.float32)
        cond, static = self.conditioning({"prompt_embeds": zeros(batch, text_tokens, self.joint_attention_dim),
                                          "prompt_embeds_mask": jnp.ones((batch, text_tokens), jnp.int32)},
                                         height, width)
        return dict(hidden_states=zeros(batch, height * width, self.in_channels), timestep=zeros(batch), **cond,
                    **dict(static))
