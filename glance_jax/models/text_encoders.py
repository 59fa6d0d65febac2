"""Flax text encoders: CLIP-L and T5 (FLUX.1) and the Qwen2.5-VL language model (Qwen-Image).

Each is a linen module with transformers' parameter names (so transformers
checkpoints load through the same table as the transformers above),
`from_pretrained(path, dtype)` for a transformers model folder or a converted
one, and `apply({"params": p}, input_ids, attention_mask)`. Attention masks
are 1 for real tokens and 0 for padding. Norms and softmax run in float32
(T5's and Qwen2's RMS norms are `layers.RMSNorm`, its `scale` is their `weight`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax.models.base import PretrainedModel
from glance_jax.models.layers import Dense, RMSNorm, biased_attention  # RMSNorm: T5LayerNorm and Qwen2RMSNorm alike

Dtype = Any
NEG = -1e30  # masked logits (finite, so fully masked rows stay NaN-free)


def _dense(features, name, dtype, bias=True):
    return Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)


def _embed(vocab, dim, name, dtype):
    return nn.Embed(vocab, dim, dtype=dtype, param_dtype=dtype, name=name)


def _padding_bias(attention_mask):
    return jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0, NEG)


def _causal_bias(length):
    return jnp.where(jnp.tril(jnp.ones((length, length), bool)), 0.0, NEG)[None, None]


class TextEncoder(PretrainedModel):
    """Mixin: transformers configs name the class in `architectures`; some keys get a prefix on the hub."""

    key_renames = ()  # (checkpoint prefix, ours)
    ignored_prefixes = ()  # checkpoint parts that are not this model (a vision tower, a head)

    def to_config(self):
        config = {k: getattr(self, k) for k in self.config_keys}
        return {"architectures": [self.architecture], "_class_name": type(self).__name__, **config}

    def example_inputs(self):
        return {"input_ids": jnp.zeros((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)}


# ---- CLIP ----

class CLIPLayer(nn.Module):
    heads: int
    intermediate: int
    eps: float
    act: str
    dtype: Dtype

    @nn.compact
    def __call__(self, x, bias):
        d = x.shape[-1]
        ln = lambda name: nn.LayerNorm(self.eps, dtype=jnp.float32, param_dtype=self.dtype, name=name)
        h = ln("layer_norm1")(x).astype(self.dtype)
        split = lambda y: y.reshape(*y.shape[:2], self.heads, d // self.heads)
        q, k, v = (split(_dense(d, f"self_attn.{n}_proj", self.dtype)(h)) for n in "qkv")
        out = biased_attention(q, k, v, bias, (d // self.heads) ** -0.5).reshape(x.shape)
        x = x + _dense(d, "self_attn.out_proj", self.dtype)(out)
        h = _dense(self.intermediate, "mlp.fc1", self.dtype)(ln("layer_norm2")(x).astype(self.dtype))
        h = h * jax.nn.sigmoid(1.702 * h) if self.act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
        return x + _dense(d, "mlp.fc2", self.dtype)(h)


class CLIPTextModel(TextEncoder, nn.Module):
    """transformers' CLIPTextModel: (last hidden state, pooled output at the first EOS token)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    architecture = "CLIPTextModel"
    config_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings", "layer_norm_eps", "hidden_act", "eos_token_id")
    key_renames = (("text_model.", ""),)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        x = _embed(self.vocab_size, self.hidden_size, "embeddings.token_embedding", self.dtype)(input_ids)
        x = x + _embed(self.max_position_embeddings, self.hidden_size, "embeddings.position_embedding",
                       self.dtype)(jnp.arange(t))[None]
        bias = _causal_bias(t)
        if attention_mask is not None:
            bias = bias + _padding_bias(attention_mask)
        for i in range(self.num_hidden_layers):
            x = CLIPLayer(self.num_attention_heads, self.intermediate_size, self.layer_norm_eps, self.hidden_act,
                          self.dtype, name=f"encoder.layers.{i}")(x, bias)
        x = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, param_dtype=self.dtype,
                         name="final_layer_norm")(x).astype(self.dtype)
        if self.eos_token_id == 2:  # transformers' legacy pooling: the highest token id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return x, x[jnp.arange(b), eos]


# ---- T5 ----

def t5_relative_buckets(length, num_buckets=32, max_distance=128):
    """transformers' bidirectional relative position buckets (T, T), computed as it does in float32."""
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int32) * half
    relative = np.abs(relative)
    exact = half // 2
    large = exact + (np.log(np.maximum(relative, 1).astype(np.float32) / np.float32(exact))
                     / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)).astype(np.int32)
    large = np.minimum(large, half - 1)
    return buckets + np.where(relative < exact, relative, large)


class T5Block(nn.Module):
    heads: int
    d_kv: int
    d_ff: int
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, bias):
        d = x.shape[-1]
        h = RMSNorm(self.eps, self.dtype, self.dtype, name="layer.0.layer_norm")(x)
        split = lambda y: y.reshape(*y.shape[:2], self.heads, self.d_kv)
        q, k, v = (split(_dense(self.heads * self.d_kv, f"layer.0.SelfAttention.{n}", self.dtype, False)(h))
                   for n in "qkv")
        out = biased_attention(q, k, v, bias, 1.0).reshape(*x.shape[:2], -1)  # T5 does not scale its logits
        x = x + _dense(d, "layer.0.SelfAttention.o", self.dtype, False)(out)
        h = RMSNorm(self.eps, self.dtype, self.dtype, name="layer.1.layer_norm")(x)
        gated = jax.nn.gelu(_dense(self.d_ff, "layer.1.DenseReluDense.wi_0", self.dtype, False)(h), approximate=True)
        h = gated * _dense(self.d_ff, "layer.1.DenseReluDense.wi_1", self.dtype, False)(h)
        return x + _dense(d, "layer.1.DenseReluDense.wo", self.dtype, False)(h)


class T5EncoderModel(TextEncoder, nn.Module):
    """transformers' T5EncoderModel (v1.1 / gated-GELU, as FLUX.1's T5-XXL): the last hidden state."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    architecture = "T5EncoderModel"
    config_keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                   "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                   "feed_forward_proj")
    unsupported = {"feed_forward_proj": "gated-gelu"}
    ignored_prefixes = ("encoder.embed_tokens.",)  # a tied copy of `shared`

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        x = _embed(self.vocab_size, self.d_model, "shared", self.dtype)(input_ids)
        buckets = t5_relative_buckets(t, self.relative_attention_num_buckets, self.relative_attention_max_distance)
        # One table of relative position biases, stored with the first block and shared by all.
        table = _embed(self.relative_attention_num_buckets, self.num_heads,
                       "encoder.block.0.layer.0.SelfAttention.relative_attention_bias", self.dtype)
        bias = table(jnp.asarray(buckets)).transpose(2, 0, 1)[None].astype(jnp.float32)
        if attention_mask is not None:
            bias = bias + _padding_bias(attention_mask)
        for i in range(self.num_layers):
            x = T5Block(self.num_heads, self.d_kv, self.d_ff, self.layer_norm_epsilon, self.dtype,
                        name=f"encoder.block.{i}")(x, bias)
        return RMSNorm(self.layer_norm_epsilon, self.dtype, self.dtype, name="encoder.final_layer_norm")(x)


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
        q = _dense(self.heads * head_dim, "self_attn.q_proj", self.dtype)(h)
        k = _dense(self.kv_heads * head_dim, "self_attn.k_proj", self.dtype)(h)
        v = _dense(self.kv_heads * head_dim, "self_attn.v_proj", self.dtype)(h)
        split = lambda y: y.reshape(*y.shape[:2], -1, head_dim)
        q, k, v = split(q), split(k), split(v)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        repeat = self.heads // self.kv_heads  # grouped-query attention
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        out = biased_attention(q, k, v, bias, head_dim ** -0.5).reshape(*x.shape[:2], -1)
        x = x + _dense(d, "self_attn.o_proj", self.dtype, False)(out)
        h = RMSNorm(self.eps, self.dtype, self.dtype, name="post_attention_layernorm")(x)
        h = jax.nn.silu(_dense(self.intermediate, "mlp.gate_proj", self.dtype, False)(h)) * _dense(
            self.intermediate, "mlp.up_proj", self.dtype, False)(h)
        return x + _dense(d, "mlp.down_proj", self.dtype, False)(h)


def rotate(x, cos, sin):
    """RoPE by halves (rotate_half) on (B, T, heads, d) with cos/sin (T, d)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


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
        x = _embed(self.vocab_size, self.hidden_size, "model.embed_tokens", self.dtype)(input_ids)
        bias = _causal_bias(t)
        if attention_mask is not None:
            bias = bias + _padding_bias(attention_mask)
        for i in range(self.num_hidden_layers):
            x = QwenLayer(self.num_attention_heads, self.num_key_value_heads, self.intermediate_size,
                          self.rms_norm_eps, self.dtype, name=f"model.layers.{i}")(x, bias, cos, sin)
        return RMSNorm(self.rms_norm_eps, self.dtype, self.dtype, name="model.norm")(x)
