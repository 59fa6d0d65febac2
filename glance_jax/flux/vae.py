"""The FLUX.1 VAE (diffusers' `AutoencoderKL`, 16 latent channels) in Flax, channels-last.

Read top to bottom: the residual block, down- and upsampling, the single-head
attention of the middle block, the encoder, the decoder, then the model with
`encode` (image -> posterior mean and log-variance) and `decode` (latents ->
image), and tiled decoding for large images. Images are NHWC in [-1, 1];
latents are NHWC and unscaled (the pipelines apply `scaling_factor` and
`shift_factor`). Module names are diffusers' (`encoder.down_blocks.0.resnets.1.conv2`);
conv kernels are (kh, kw, in, out), the transpose of torch's (out, in, kh, kw).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glance_jax.modules.base import PretrainedModel
from glance_jax.modules.layers import Dense

Dtype = Any


def conv(features, kernel, name, dtype, stride=1, padding=None):
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, param_dtype=dtype, name=name)


def group_norm(groups, name, dtype):
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=jnp.float32, param_dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without time embedding: two GroupNorm-SiLU-conv, a 1x1 shortcut if widths differ."""

    out_channels: int
    groups: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(group_norm(self.groups, "norm1", self.dtype)(x)))
        h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(group_norm(self.groups, "norm2", self.dtype)(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return (x + h).astype(self.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row and column at the bottom and right (diffusers' padding=0)."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=0)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, "conv", self.dtype)(x)


class MidAttention(nn.Module):
    """Single-head self-attention over all pixels, with GroupNorm in front and a residual around it."""

    groups: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(self.groups, "group_norm", self.dtype)(x).reshape(b, h * w, 1, c).astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        q, k, v = (Dense(c, **kw, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
        return x + Dense(c, **kw, name="to_out.0")(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
    groups: int
    attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets.0")(x)
        if self.attention:
            x = MidAttention(self.groups, self.dtype, name="attentions.0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets.1")(x)


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    latent_channels: int
    mid_attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        x = conv(self.block_out_channels[0], 3, "conv_in", self.dtype)(x)
        for i, width in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                x = ResnetBlock(width, self.groups, self.dtype, name=f"down_blocks.{i}.resnets.{j}")(x)
            if i < len(self.block_out_channels) - 1:
                x = Downsample(self.dtype, name=f"down_blocks.{i}.downsamplers.0")(x)
        x = MidBlock(self.groups, self.mid_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(self.groups, "conv_norm_out", self.dtype)(x))
        return conv(2 * self.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    out_channels: int
    mid_attention: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, z):
        widths = list(reversed(self.block_out_channels))
        x = conv(widths[0], 3, "conv_in", self.dtype)(z)
        x = MidBlock(self.groups, self.mid_attention, self.dtype, name="mid_block")(x)
        for i, width in enumerate(widths):
            for j in range(self.layers_per_block + 1):
                x = ResnetBlock(width, self.groups, self.dtype, name=f"up_blocks.{i}.resnets.{j}")(x)
            if i < len(widths) - 1:
                x = Upsample(self.dtype, name=f"up_blocks.{i}.upsamplers.0")(x)
        x = nn.silu(group_norm(self.groups, "conv_norm_out", self.dtype)(x))
        return conv(self.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(PretrainedModel, nn.Module):
    """diffusers' AutoencoderKL (the FLUX.1 VAE with its default config). Fields are diffusers' config keys.

    `apply({"params": p}, x, method="encode")` -> (mean, logvar), NHWC; `method="decode"` -> image, NHWC.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    sample_size: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    config_keys = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                   "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                   "scaling_factor", "shift_factor", "sample_size")
    unsupported = {"act_fn": "silu"}

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      groups=self.norm_num_groups, mid_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, 1, None, self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, 1, None, self.dtype)

    def encode(self, x):
        """Posterior (mean, logvar) of images (B, H, W, 3) in [-1, 1]; logvar clipped to [-30, 20] as diffusers."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Images (B, 8h, 8w, 3) from unscaled latents (B, h, w, C)."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)

    def example_inputs(self):
        return {"x": jnp.zeros((1, 16, 16, self.in_channels), jnp.float32)}

    def to_config(self):
        n = len(self.block_out_channels)
        return {**super().to_config(), "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu"}

    @property
    def spatial_scale(self):
        return 2 ** (len(self.block_out_channels) - 1)

    def tiling(self):
        """diffusers' tiling defaults: (tile size, tile stride) in pixels, and the decode method for tiles."""
        return self.sample_size, self.sample_size - int(self.sample_size * 0.25), "decode"

    def normalize(self, mean):
        """Posterior mean -> the latents the transformer works on: `(mean - shift_factor) * scaling_factor`."""
        return (mean - (self.shift_factor or 0.0)) * self.scaling_factor

    def denormalize(self, latents):
        """The inverse of `normalize`: transformer latents -> what the decoder takes."""
        return latents / self.scaling_factor + (self.shift_factor or 0.0)

    def add_frames(self, x):
        """Images or latents (B, H, W, C) in the layout `encode` / `decode` take: NHWC already."""
        return x

    def drop_frames(self, x):
        """The inverse of `add_frames`."""
        return x
