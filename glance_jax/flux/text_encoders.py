"""Flax CLIP-L and T5 encoders, FLUX.1's two text encoders, with transformers' parameter names."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax.modules.layers import RMSNorm, biased_attention  # RMSNorm: T5LayerNorm alike
from glance_jax.modules.text import TextEncoder, causal_bias, dense, embed, padding_bias

Dtype = Any


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
        q, k, v = (split(dense(d, f"self_attn.{n}_proj", self.dtype)(h)) for n in "qkv")
        out = biased_attention(q, k, v, bias, (d // self.heads) ** -0.5).reshape(x.shape)
        x = x + dense(d, "self_attn.out_proj", self.dtype)(out)
        h = dense(self.intermediate, "mlp.fc1", self.dtype)(ln("layer_norm2")(x).astype(self.dtype))
        h = h * jax.nn.sigmoid(1.702 * h) if self.act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
        return x + dense(d, "mlp.fc2", self.dtype)(h)


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
        x = embed(self.vocab_size, self.hidden_size, "embeddings.token_embedding", self.dtype)(input_ids)
        x = x + embed(self.max_position_embeddings, self.hidden_size, "embeddings.position_embedding",
                       self.dtype)(jnp.arange(t))[None]
        bias = causal_bias(t)
        if attention_mask is not None:
            bias = bias + padding_bias(attention_mask)
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
        q, k, v = (split(dense(self.heads * self.d_kv, f"layer.0.SelfAttention.{n}", self.dtype, False)(h))
                   for n in "qkv")
        out = biased_attention(q, k, v, bias, 1.0).reshape(*x.shape[:2], -1)  # T5 does not scale its logits
        x = x + dense(d, "layer.0.SelfAttention.o", self.dtype, False)(out)
        h = RMSNorm(self.eps, self.dtype, self.dtype, name="layer.1.layer_norm")(x)
        gated = jax.nn.gelu(dense(self.d_ff, "layer.1.DenseReluDense.wi_0", self.dtype, False)(h), approximate=True)
        h = gated * dense(self.d_ff, "layer.1.DenseReluDense.wi_1", self.dtype, False)(h)
        return x + dense(d, "layer.1.DenseReluDense.wo", self.dtype, False)(h)


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
        x = embed(self.vocab_size, self.d_model, "shared", self.dtype)(input_ids)
        buckets = t5_relative_buckets(t, self.relative_attention_num_buckets, self.relative_attention_max_distance)
        # One table of relative position biases, stored with the first block and shared by all.
        table = embed(self.relative_attention_num_buckets, self.num_heads,
                       "encoder.block.0.layer.0.SelfAttention.relative_attention_bias", self.dtype)
        bias = table(jnp.asarray(buckets)).transpose(2, 0, 1)[None].astype(jnp.float32)
        if attention_mask is not None:
            bias = bias + padding_bias(attention_mask)
        for i in range(self.num_layers):
            x = T5Block(self.num_heads, self.d_kv, self.d_ff, self.layer_norm_epsilon, self.dtype,
                        name=f"encoder.block.{i}")(x, bias)
        return RMSNorm(self.layer_norm_epsilon, self.dtype, self.dtype, name="encoder.final_layer_norm")(x)
