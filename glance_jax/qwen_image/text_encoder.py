"""Flax Qwen2.5-VL language model (text-only prompts), Qwen-Image's text encoder, with transformers' parameter names."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax.modules.layers import RMSNorm, biased_attention
from glance_jax.modules.text import TextEncoder, causal_bias, dense, embed, padding_bias

Dtype = Any


# ---- Qwen2.5-VL language model ----

class QwenLayer(nn.Module):
    heads: int
    kv_heads: int
    intermediate: int
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, bias, cos, sin):
        d = x.shape[-1]
        head_dim = d // self.heads
        h = RMSNorm(self.eps, self.dtype, self.dtype, name="input_layernorm")(x)
        q = dense(self.heads * head_dim, "self_attn.q_proj", self.dtype)(h)
        k = dense(self.kv_heads * head_dim, "self_attn.k_proj", self.dtype)(h)
        v = dense(self.kv_heads * head_dim, "self_attn.v_proj", self.dtype)(h)
        split = lambda y: y.reshape(*y.shape[:2], -1, head_dim)
        q, k, v = split(q), split(k), split(v)
        q, k = rope_by_halves(q, cos, sin), rope_by_halves(k, cos, sin)
        repeat = self.heads // self.kv_heads  # grouped-query attention
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        out = biased_attention(q, k, v, bias, head_dim ** -0.5).reshape(*x.shape[:2], -1)
        x = x + dense(d, "self_attn.o_proj", self.dtype, False)(out)
        h = RMSNorm(self.eps, self.dtype, self.dtype, name="post_attention_layernorm")(x)
        h = jax.nn.silu(dense(self.intermediate, "mlp.gate_proj", self.dtype, False)(h)) * dense(
            self.intermediate, "mlp.up_proj", self.dtype, False)(h)
        return x + dense(d, "mlp.down_proj", self.dtype, False)(h)


def rope_by_halves(x, cos, sin):
    """RoPE by halves (rotate_half) on (B, T, heads, d) with cos/sin (T, d), or (B, T, d) (per-sequence positions)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = (c[None, :, None] if c.ndim == 2 else c[:, :, None] for c in (cos, sin))
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Qwen25VLTextModel(TextEncoder, nn.Module):
    """The language model of Qwen2.5-VL for text-only prompts: the final (normed) hidden states.

    Without images, Qwen2.5-VL's multimodal RoPE gives every token the same
    position on its three axes (0, 1, 2, ... whatever the padding), which is
    plain RoPE with theta `rope_theta`. The vision tower and the LM head of a
    full checkpoint are not part of this model and are left out on loading.
    """

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    architecture = "Qwen2_5_VLForConditionalGeneration"
    config_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "rms_norm_eps", "rope_theta")
    key_renames = (("model.language_model.", "model."),)
    ignored_prefixes = ("visual.", "model.visual.", "lm_head.")

    @classmethod
    def from_config(cls, config, dtype=jnp.float32, **overrides):
        """Reads the text settings of a Qwen2.5-VL config (its `text_config`, or the top level of older ones)."""
        text = dict(config.get("text_config") or config)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        text.setdefault("rope_theta", rope.get("rope_theta", config.get("rope_theta", 1000000.0)))
        return super().from_config({**text, "_class_name": cls.__name__}, dtype, **overrides)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        head_dim = self.hidden_size // self.num_attention_heads
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        angles = np.arange(t, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]
        cos, sin = (jnp.asarray(np.concatenate([f(angles)] * 2, axis=-1)) for f in (np.cos, np.sin))
        x = embed(self.vocab_size, self.hidden_size, "model.embed_tokens", self.dtype)(input_ids)
        bias = causal_bias(t)
        if attention_mask is not None:
            bias = bias + padding_bias(attention_mask)
        for i in range(self.num_hidden_layers):
            x = QwenLayer(self.num_attention_heads, self.num_key_value_heads, self.intermediate_size,
                          self.rms_norm_eps, self.dtype, name=f"model.layers.{i}")(x, bias, cos, sin)
        return RMSNorm(self.rms_norm_eps, self.dtype, self.dtype, name="model.norm")(x)
