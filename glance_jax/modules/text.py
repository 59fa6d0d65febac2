"""What the Flax text encoders share (CLIP-L and T5 in glance_jax/flux, Qwen2.5-VL in glance_jax/qwen_image).

Each is a linen module with transformers' parameter names (so transformers
checkpoints load through the same table as the transformers above),
`from_pretrained(path, dtype)` for a transformers model folder or a converted
one, and `apply({"params": p}, input_ids, attention_mask)`. Attention masks
are 1 for real tokens and 0 for padding. Norms and softmax run in float32
(T5's and Qwen2's RMS norms are `layers.RMSNorm`, its `scale` is their `weight`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from glance_jax.modules.base import PretrainedModel
from glance_jax.modules.layers import Dense

Dtype = Any
NEG = -1e30  # masked logits (finite, so fully masked rows stay NaN-free)


def dense(features, name, dtype, bias=True):
    return Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)


def embed(vocab, dim, name, dtype):
    return nn.Embed(vocab, dim, dtype=dtype, param_dtype=dtype, name=name)


def padding_bias(attention_mask):
    return jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0, NEG)


def causal_bias(length):
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
