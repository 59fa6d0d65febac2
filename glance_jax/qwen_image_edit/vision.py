"""Flax Qwen2.5-VL vision tower (transformers' `Qwen2_5_VisionTransformerPretrainedModel`), with its parameter names.

Patches (`pixel_values`, (patches, C * T * P * P) as the image processor lays them out, 2 x 2 merge blocks
consecutive) are embedded by the patch convolution (a dense layer over the flattened patch), rotated by a 2-D
RoPE (row, column), and run through blocks whose attention stays within one image (`fullatt_block_indexes`)
or within one window of `window_size` pixels of one image (every other block). The blocks see the patches
window by window (transformers' `window_index` order); the merger (RMS norm, 2 x 2 blocks concatenated,
Linear, GELU, Linear) puts the merged tokens back in image order: (sum of t * h * w / 4, out_hidden_size).

Everything that depends on the grids (`image_grid_thw`, static Python ints) is computed in numpy: the
permutation into window order and back, the rotary angles, and for each kind of attention the segments
(images, windows) gathered into a padded (segments, longest, ...) batch with a key mask, so attention never
builds a (patches x patches) mask.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glance_jax.errors import GlanceError
from glance_jax.modules.attention import attention
from glance_jax.modules.layers import RMSNorm
from glance_jax.modules.text import dense
from glance_jax.qwen_image.text_encoder import rope_by_halves

Dtype = Any
VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
               "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size", "fullatt_block_indexes")


def vision_fields(vision_config):
    """The fields of `Qwen25VisionTransformer` that a transformers `vision_config` dict sets (older files name
    the input channels `in_chans`; the rotary base is `rope_parameters.rope_theta` or `rope_theta`, else 10000)."""
    config = dict(vision_config or {})
    if "in_channels" not in config and "in_chans" in config:
        config["in_channels"] = config["in_chans"]
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise GlanceError(f"vision_config: hidden_act={act!r} is not supported (Qwen2.5-VL's vision MLP is silu)")
    fields = {k: tuple(config[k]) if isinstance(config[k], list) else config[k] for k in VISION_KEYS if k in config}
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        fields["rope_theta"] = float(theta)
    return fields


@functools.lru_cache(maxsize=64)
def vision_layout(grid_thw, spatial_merge_size, window_size, patch_size):
    """The static index arrays of a set of grids ((t, h, w) per image, in patches), as a dict:

    - `order`: patch permutation into window order (transformers' `window_index`, expanded to whole merge blocks);
    - `positions`: (patches, 2) row and column of each patch, in that order;
    - `restore`: merged-token permutation back to image order (argsort of `window_index`);
    - `full`, `windows`: the attention segments of each kind (`_segments` of their boundaries).
    """
    m = spatial_merge_size
    unit = m * m
    side = window_size // m // patch_size  # merged tokens along one side of a window
    if side < 1:
        raise GlanceError(f"vision window_size {window_size} is smaller than one merge block "
                          f"({m} x {patch_size} pixels)")
    positions, window_index, window_bounds, frame_bounds, offset = [], [], [0], [0], 0
    for t, h, w in grid_thw:
        if h % m or w % m:
            raise GlanceError(f"image grid {t}x{h}x{w}: height and width must be multiples of {m}")
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        positions.append(np.tile(np.stack([blocks(rows), blocks(cols)], axis=-1), (t, 1)))
        gh, gw = h // m, w // m
        padded_h, padded_w = (gh // side + 1) * side, (gw // side + 1) * side  # as transformers pads
        index = np.full((t, padded_h, padded_w), -1)
        index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        windows = index.reshape(t, padded_h // side, side, padded_w // side, side).transpose(0, 1, 3, 2, 4)
        windows = windows.reshape(-1, side * side)
        window_index.append(windows[windows >= 0] + offset)
        lengths = (windows >= 0).sum(axis=1)
        window_bounds.extend((window_bounds[-1] + np.cumsum(lengths[lengths > 0]) * unit).tolist())
        frame_bounds.extend(frame_bounds[-1] + h * w * np.arange(1, t + 1))
        offset += t * gh * gw
    window_index = np.concatenate(window_index)
    order = (window_index[:, None] * unit + np.arange(unit)[None]).reshape(-1)
    return {"order": order, "positions": np.concatenate(positions)[order], "restore": np.argsort(window_index),
            "full": _segments(frame_bounds), "windows": _segments(window_bounds)}


def _segments(bounds):
    """(gather, valid, scatter) for the segments [bounds[i], bounds[i + 1]) of a sequence: `x[gather]` is the
    (segments, longest, ...) padded batch, `valid` its key mask, `batch.reshape(-1, ...)[scatter]` the sequence."""
    bounds = np.asarray(bounds)
    starts, lengths = bounds[:-1], np.diff(bounds)
    longest = int(lengths.max())
    offsets = np.arange(longest)[None]
    gather = starts[:, None] + np.minimum(offsets, lengths[:, None] - 1)
    valid = offsets < lengths[:, None]
    scatter = (np.arange(len(lengths))[:, None] * longest + offsets)[valid]
    return gather, valid, scatter


def _segment_attention(q, k, v, segments, implementation):
    """Attention of (N, heads, d) queries within each segment (`_segments` of the sequence)."""
    gather, valid, scatter = segments
    n, heads, d = q.shape
    if gather.shape[0] == 1 and valid.all():  # one segment: the whole sequence
        return attention(q[None], k[None], v[None], None, implementation)[0]
    out = attention(q[gather], k[gather], v[gather], jnp.asarray(valid), implementation)
    return out.reshape(-1, heads, d)[scatter]


def _rotary(positions, head_dim, theta):
    """cos, sin (N, head_dim) of the vision RoPE: row angles, then column angles, the pair repeated (float32)."""
    dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    angles = positions[..., None].astype(np.float32) * inv_freq.astype(np.float32)  # (N, 2, dim / 2)
    angles = np.concatenate([angles[:, 0], angles[:, 1]], axis=-1)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


class PatchEmbed(nn.Module):
    """The Conv3d (kernel = stride = T x P x P, no bias) on flattened patches: one matrix product. The kernel is
    stored (T, P, P, C, out), which the loader maps to torch's (out, C, T, P, P)."""

    features: int
    in_channels: int
    temporal_patch_size: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        t, p, c = self.temporal_patch_size, self.patch_size, self.in_channels
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (t, p, p, c, self.features), self.param_dtype)
        kernel = kernel.transpose(3, 0, 1, 2, 4).reshape(c * t * p * p, self.features)  # pixel order (C, T, P, P)
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class VisionBlock(nn.Module):
    heads: int
    intermediate: int
    dtype: Dtype
    attention_implementation: str

    @nn.compact
    def __call__(self, x, cos, sin, segments):
        n, d = x.shape
        head_dim = d // self.heads
        h = RMSNorm(1e-6, self.dtype, self.dtype, name="norm1")(x)
        qkv = dense(3 * d, "attn.qkv", self.dtype)(h).reshape(n, 3, self.heads, head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = rope_by_halves(q[None], cos, sin)[0], rope_by_halves(k[None], cos, sin)[0]
        out = _segment_attention(q, k, v, segments, self.attention_implementation).reshape(n, d)
        x = x + dense(d, "attn.proj", self.dtype)(out)
        h = RMSNorm(1e-6, self.dtype, self.dtype, name="norm2")(x)
        h = jax.nn.silu(dense(self.intermediate, "mlp.gate_proj", self.dtype)(h)) * dense(
            self.intermediate, "mlp.up_proj", self.dtype)(h)
        return x + dense(d, "mlp.down_proj", self.dtype)(h)


class Qwen25VisionTransformer(nn.Module):
    """Qwen2.5-VL's vision tower: `apply({"params": p}, pixel_values, image_grid_thw)` -> (merged tokens,
    out_hidden_size), `image_grid_thw` a tuple of (t, h, w) Python ints per image (static under jit).

    Defaults are Qwen2.5-VL-7B's (Qwen-Image's text encoder). `attention_implementation` names the kernel of
    `glance_jax.modules.attention` ("xla" by default: exact in float32 on every platform).
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: Sequence[int] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    attention_implementation: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def patch_dim(self):
        """The width of one row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @nn.compact
    def __call__(self, pixel_values, image_grid_thw):
        grids = tuple(tuple(int(v) for v in grid) for grid in image_grid_thw)
        layout = vision_layout(grids, self.spatial_merge_size, self.window_size, self.patch_size)
        patches = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (patches, self.patch_dim):
            raise GlanceError(f"pixel_values {tuple(pixel_values.shape)}: the grids {grids} need "
                              f"({patches}, {self.patch_dim})")
        x = PatchEmbed(self.hidden_size, self.in_channels, self.temporal_patch_size, self.patch_size, self.dtype,
                       self.param_dtype, name="patch_embed.proj")(pixel_values)
        x = x[layout["order"]]
        cos, sin = (jnp.asarray(a) for a in _rotary(layout["positions"], self.hidden_size // self.num_heads,
                                                    self.rope_theta))
        for i in range(self.depth):
            kind = layout["full"] if i in self.fullatt_block_indexes else layout["windows"]
            x = VisionBlock(self.num_heads, self.intermediate_size, self.dtype, self.attention_implementation,
                            name=f"blocks.{i}")(x, cos, sin, kind)
        merged = self.hidden_size * self.spatial_merge_size ** 2
        x = RMSNorm(1e-6, self.dtype, self.dtype, name="merger.ln_q")(x).reshape(-1, merged)
        x = jax.nn.gelu(dense(merged, "merger.mlp.0", self.dtype)(x), approximate=False)
        x = dense(self.out_hidden_size, "merger.mlp.2", self.dtype)(x)
        return x[layout["restore"]]
