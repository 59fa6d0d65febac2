"""Flax Qwen2.5-VL as Qwen-Image-Edit's text encoder: the vision tower and the language model, the final (normed)
hidden states of a prompt whose `<|image_pad|>` tokens are the image's merged patches.

`Qwen25VLModel.apply({"params": p}, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids)` is
transformers' `Qwen2_5_VLForConditionalGeneration(..., output_hidden_states=True).hidden_states[-1]`:

- the embeddings of the image-pad tokens (`image_token_id`) are replaced, in order (row by row), by the vision
  tower's outputs for the images of `pixel_values` (grids `image_grid_thw`, static Python ints);
- positions are Qwen2.5-VL's multimodal RoPE, (3, B, T) temporal / row / column ids (`mrope_positions`): text
  tokens count up on all three axes, an image's tokens take (0, row, column) of its merged grid plus the position
  where it starts, and the text after it resumes at that start + max(rows, columns). The frequencies of the
  rotary half are split among the three axes by `mrope_section` (Qwen2.5-VL-7B: 16, 24, 24; their sum is half
  the head width). Padded tokens (attention mask 0) are skipped when counting; without `position_ids` they
  are computed in numpy from concrete `input_ids` (under jit, pass them).

Checkpoints are transformers' `Qwen2_5_VLForConditionalGeneration` folders: `model.language_model.*` and
`model.visual.*` (transformers 5) or `model.*` and `visual.*` (older files, and this model's own names); the
LM head is left out. The class claims no `architecture`: that name stays with `Qwen25VLTextModel` (Qwen-Image's
text-only encoder, loading the same files), so `Qwen25VLModel.from_pretrained` names the class itself.
"""

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax import checkpoints
from glance_jax.checkpoints import hub
from glance_jax.errors import GlanceError
from glance_jax.modules.layers import RMSNorm
from glance_jax.modules.text import TextEncoder, causal_bias, embed, padding_bias
from glance_jax.qwen_image.text_encoder import QwenLayer
from glance_jax.qwen_image_edit.vision import Qwen25VisionTransformer, vision_fields

Dtype = Any
CHECKPOINT_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


def mrope_positions(input_ids, attention_mask, image_grid_thw, image_token_id, spatial_merge_size):
    """(3, B, T) int32 multimodal RoPE positions (transformers' `get_rope_index` for images), in numpy.

    The images' grids are taken in order across the batch, one for each run of t * h * w / merge**2 image
    tokens; without grids, image tokens count as text. Padding (mask 0) gets position 0.
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = list(image_grid_thw)
    m = spatial_merge_size
    out = np.zeros((3, *ids.shape), np.int32)
    for row in range(ids.shape[0]):
        real = np.flatnonzero(mask[row])
        tokens = ids[row, real]
        pos = np.zeros((3, len(real)), np.int64)
        i = current = 0
        while i < len(tokens):
            if tokens[i] == image_token_id and grids:
                t, h, w = (int(v) for v in grids.pop(0))
                n = t * (h // m) * (w // m)
                if i + n > len(tokens) or not (tokens[i:i + n] == image_token_id).all():
                    raise GlanceError(f"an image of grid {t}x{h}x{w} needs {n} consecutive image tokens")
                grid = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
                pos[:, i:i + n] = np.stack(grid).reshape(3, -1) + current
                current += max(h, w) // m
                i += n
            else:
                pos[:, i] = current
                current += 1
                i += 1
        out[:, row, real] = pos
    if grids:
        raise GlanceError(f"{len(grids)} image(s) left over: the prompts hold fewer image tokens than the images need")
    return out


def sequential_positions(batch, length):
    """(3, B, T) positions 0 .. T - 1 on every axis, whatever the images and padding: what transformers >= 5 uses
    when it is not given `mm_token_type_ids` (as diffusers 0.42's Qwen-Image-Edit pipelines call it)."""
    return np.broadcast_to(np.arange(length, dtype=np.int32), (3, batch, length)).copy()


def mrope_cos_sin(position_ids, head_dim, theta, mrope_section):
    """cos, sin (B, T, head_dim) float32 of (3, B, T) positions: frequency j of the rotary half turns with the
    position of axis (section of j) % 3, the half repeated (transformers' Qwen2.5-VL text rotary embedding)."""
    if sum(mrope_section) != head_dim // 2:
        raise GlanceError(f"mrope_section {list(mrope_section)} adds up to {sum(mrope_section)}, not half the head "
                          f"width ({head_dim // 2})")
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)))
    axis = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
    pos = jnp.asarray(position_ids).astype(jnp.float32)[axis]  # (head_dim / 2, B, T)
    angles = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class Qwen25VLModel(TextEncoder, nn.Module):
    """Qwen2.5-VL, vision tower included: the final (normed) hidden states (B, T, hidden_size).

    Text fields are those of `Qwen25VLTextModel`; `vision_config` holds the `Qwen25VisionTransformer` fields as
    (name, value) pairs (hashable), read from the checkpoint's `vision_config`.
    """

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: Sequence[int] = (16, 24, 24)
    image_token_id: int = 151655
    vision_config: tuple = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    config_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "rms_norm_eps", "rope_theta", "mrope_section", "image_token_id")
    key_renames = (("model.language_model.", "model."), ("model.visual.", "visual."))
    ignored_prefixes = ("lm_head.",)

    @classmethod
    def from_config(cls, config, dtype=jnp.float32, **overrides):
        """From a transformers Qwen2.5-VL config.json (`text_config` / `vision_config`, or the older flat layout
        with `rope_scaling`) or a converted folder's (flat, `vision_config` a dict)."""
        text = dict(config.get("text_config") or config)
        rope = (text.get("rope_parameters") or text.get("rope_scaling") or config.get("rope_parameters")
                or config.get("rope_scaling") or {})
        text.setdefault("rope_theta", rope.get("rope_theta", config.get("rope_theta", 1000000.0)))
        text.setdefault("mrope_section", rope.get("mrope_section", config.get("mrope_section", [16, 24, 24])))
        text["image_token_id"] = config.get("image_token_id", text.get("image_token_id", 151655))
        vision = tuple(sorted(vision_fields(config.get("vision_config")).items()))
        overrides.setdefault("vision_config", vision)
        return super().from_config({**text, "_class_name": cls.__name__}, dtype, **overrides)

    def to_config(self):
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in
                                                                          self.config_keys)}
        vision = {k: list(v) if isinstance(v, tuple) else v for k, v in self.vision_config}
        return {"_class_name": type(self).__name__, **config, "vision_config": vision}

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, **overrides):
        """`(model, params)` from a `Qwen2_5_VLForConditionalGeneration` folder, a Qwen-Image-Edit pipeline folder
        (its `text_encoder/`), a hub id of one, or a converted folder."""
        path = hub.resolve(path, "the text encoder path", ("text_encoder",))
        if os.path.isfile(os.path.join(path, checkpoints.PIPELINE_FILE)):
            path = os.path.join(path, "text_encoder")
        classes = {cls.__name__: cls, CHECKPOINT_ARCHITECTURE: cls}
        return checkpoints.load_model(path, dtype=dtype, expected_class=cls, classes=classes, **overrides)

    @property
    def vision(self):
        """The vision tower's fields (a `Qwen25VisionTransformer` with them, unbound)."""
        return Qwen25VisionTransformer(**dict(self.vision_config), dtype=self.dtype, param_dtype=self.param_dtype,
                                       parent=None)

    def example_inputs(self):
        """One image of one merged token in a four-token prompt (numpy: positions are computed from them)."""
        vision = self.vision
        m = vision.spatial_merge_size
        return {"input_ids": np.array([[1, self.image_token_id, 2, 3]], np.int32),
                "attention_mask": np.ones((1, 4), np.int32),
                "pixel_values": np.zeros((m * m, vision.patch_dim), np.float32),
                "image_grid_thw": ((1, m, m),)}

    def positions(self, input_ids, attention_mask=None, image_grid_thw=()):
        """`mrope_positions` of a prompt batch for this model (numpy)."""
        return mrope_positions(input_ids, attention_mask, image_grid_thw, self.image_token_id,
                               dict(self.vision_config).get("spatial_merge_size", 2))

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=(), position_ids=None):
        b, t = input_ids.shape
        grids = tuple(tuple(int(v) for v in grid) for grid in image_grid_thw)
        x = embed(self.vocab_size, self.hidden_size, "model.embed_tokens", self.dtype)(input_ids)
        if pixel_values is not None:
            features = Qwen25VisionTransformer(**dict(self.vision_config), dtype=self.dtype,
                                               param_dtype=self.param_dtype, name="visual")(pixel_values, grids)
            is_image = input_ids == self.image_token_id
            index = jnp.cumsum(is_image.reshape(-1)).reshape(b, t) - 1
            x = jnp.where(is_image[..., None], features[jnp.clip(index, 0, features.shape[0] - 1)].astype(x.dtype), x)
        if position_ids is None:
            if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
                raise GlanceError("Qwen25VLModel under jit: pass position_ids (model.positions(input_ids, "
                                  "attention_mask, image_grid_thw))")
            position_ids = self.positions(input_ids, attention_mask, grids if pixel_values is not None else ())
        head_dim = self.hidden_size // self.num_attention_heads
        cos, sin = mrope_cos_sin(position_ids, head_dim, self.rope_theta, self.mrope_section)
        bias = causal_bias(t)
        if attention_mask is not None:
            bias = bias + padding_bias(jnp.asarray(attention_mask))
        for i in range(self.num_hidden_layers):
            x = QwenLayer(self.num_attention_heads, self.num_key_value_heads, self.intermediate_size,
                          self.rms_norm_eps, self.dtype, name=f"model.layers.{i}")(x, bias, cos, sin)
        return RMSNorm(self.rms_norm_eps, self.dtype, self.dtype, name="model.norm")(x)
