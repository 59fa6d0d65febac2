"""The Qwen-Image VAE (diffusers' `AutoencoderKLQwenImage`, a causal 3-D VAE) in Flax, for single-frame images.

Arrays are NTHWC. Convolutions are causal in time (zero frames are padded in
front), so one frame goes through exactly as the first chunk of diffusers'
chunked video pass does; the temporal resampling convs (`time_conv`) only act
from the second chunk on, so for images they are loaded but not applied.
Norms are RMS norms over channels (`gamma`, kept in torch's broadcast shape).
Read top to bottom: causal conv, RMS norm, residual block, attention,
resampling, encoder, decoder, model. Names are diffusers' module names.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from glance_jax.errors import GlanceError
from glance_jax.modules.base import PretrainedModel

Dtype = Any
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
               1.6382, 1.1253, 2.8251, 1.9160)


class CausalConv3d(nn.Module):
    """3-D conv over (T, H, W), zero-padded `2 * pad_t` frames in front only; kernel (kt, kh, kw, in, out)."""

    features: int
    kernel: Sequence[int]
    padding: Sequence[int] = (0, 0, 0)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, apply=True):
        """`apply=False` only declares the parameters (a time_conv that a single frame never reaches)."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], self.features),
                            self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        if not apply:
            return x
        pt, ph, pw = self.padding
        x = jnp.pad(x, ((0, 0), (2 * pt, 0), (ph, ph), (pw, pw), (0, 0)))
        y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1, 1), "VALID",
                                         dimension_numbers=("NTHWC", "THWIO", "NTHWC"))
        return y + bias.astype(y.dtype)


class ChannelNorm(nn.Module):
    """diffusers' QwenImageRMS_norm: x / ||x|| over channels, times sqrt(C) and `gamma` (an RMS norm without eps,
    its `gamma` shaped (C, 1, ...) as torch keeps it; the transformers' RMSNorm is `layers.RMSNorm`)."""

    broadcast_dims: int  # 3 for 5-D activations, 2 for the attention's 4-D ones (torch keeps gamma as (C, 1, ...))

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,) + (1,) * self.broadcast_dims, x.dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.maximum(jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True)), 1e-12)
        return (x32 / norm * c ** 0.5 * gamma.reshape(-1).astype(jnp.float32)).astype(x.dtype)


class ResidualBlock(nn.Module):
    out_dim: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        shortcut = x
        if x.shape[-1] != self.out_dim:
            shortcut = CausalConv3d(self.out_dim, (1, 1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        h = nn.silu(ChannelNorm(3, name="norm1")(x))
        h = CausalConv3d(self.out_dim, (3, 3, 3), (1, 1, 1), self.dtype, name="conv1")(h)
        h = nn.silu(ChannelNorm(3, name="norm2")(h))
        h = CausalConv3d(self.out_dim, (3, 3, 3), (1, 1, 1), self.dtype, name="conv2")(h)
        return h + shortcut


def frames_as_images(fn, x):
    """Applies a per-image function to every frame of (B, T, H, W, C)."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame; 1x1 convs for q|k|v and the projection."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]

        def attend(img):
            n, h, w, _ = img.shape
            qkv = nn.Conv(3 * c, (1, 1), dtype=self.dtype, param_dtype=self.dtype, name="to_qkv")(
                ChannelNorm(2, name="norm")(img))
            q, k, v = jnp.split(qkv.reshape(n, h * w, 1, 3 * c), 3, axis=-1)
            out = jax.nn.dot_product_attention(q, k, v).reshape(n, h, w, c)
            return nn.Conv(c, (1, 1), dtype=self.dtype, param_dtype=self.dtype, name="proj")(out)

        return x + frames_as_images(attend, x)


class Resample(nn.Module):
    """2x spatial down- or upsampling per frame ("downsample2d/3d", "upsample2d/3d"); upsampling halves channels."""

    mode: str
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.dtype, name="resample.1")
        if self.mode.startswith("upsample"):
            fn = lambda img: nn.Conv(c // 2, (3, 3), padding=((1, 1), (1, 1)), **kw)(
                jnp.repeat(jnp.repeat(img, 2, axis=1), 2, axis=2))
        else:
            fn = lambda img: nn.Conv(c, (3, 3), strides=(2, 2), padding="VALID", **kw)(
                jnp.pad(img, ((0, 0), (0, 1), (0, 1), (0, 0))))
        y = frames_as_images(fn, x)
        if self.mode == "upsample3d":
            CausalConv3d(2 * c, (3, 1, 1), (1, 0, 0), self.dtype, name="time_conv")(x, apply=False)
        elif self.mode == "downsample3d":
            CausalConv3d(c, (3, 1, 1), dtype=self.dtype, name="time_conv")(y, apply=False)
        return y


class MidBlock(nn.Module):
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResidualBlock(c, self.dtype, name="resnets.0")(x)
        x = AttentionBlock(self.dtype, name="attentions.0")(x)
        return ResidualBlock(c, self.dtype, name="resnets.1")(x)


class Encoder3d(nn.Module):
    dim: int
    z_dim: int
    dim_mult: Sequence[int]
    num_res_blocks: int
    temperal_downsample: Sequence[bool]
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        dims = [self.dim * m for m in (1, *self.dim_mult)]
        x = CausalConv3d(dims[0], (3, 3, 3), (1, 1, 1), self.dtype, name="conv_in")(x)
        index = 0
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(self.num_res_blocks):
                x = ResidualBlock(out_dim, self.dtype, name=f"down_blocks.{index}")(x)
                index += 1
            if i != len(self.dim_mult) - 1:
                mode = "downsample3d" if self.temperal_downsample[i] else "downsample2d"
                x = Resample(mode, self.dtype, name=f"down_blocks.{index}")(x)
                index += 1
        x = MidBlock(self.dtype, name="mid_block")(x)
        x = nn.silu(ChannelNorm(3, name="norm_out")(x))
        return CausalConv3d(self.z_dim, (3, 3, 3), (1, 1, 1), self.dtype, name="conv_out")(x)


class Decoder3d(nn.Module):
    dim: int
    dim_mult: Sequence[int]
    num_res_blocks: int
    temperal_upsample: Sequence[bool]
    out_channels: int
    dtype: Dtype

    @nn.compact
    def __call__(self, z):
        dims = [self.dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        x = CausalConv3d(dims[0], (3, 3, 3), (1, 1, 1), self.dtype, name="conv_in")(z)
        x = MidBlock(self.dtype, name="mid_block")(x)
        for i, out_dim in enumerate(dims[1:]):
            for j in range(self.num_res_blocks + 1):
                x = ResidualBlock(out_dim, self.dtype, name=f"up_blocks.{i}.resnets.{j}")(x)
            if i != len(self.dim_mult) - 1:
                mode = "upsample3d" if self.temperal_upsample[i] else "upsample2d"
                x = Resample(mode, self.dtype, name=f"up_blocks.{i}.upsamplers.0")(x)
        x = nn.silu(ChannelNorm(3, name="norm_out")(x))
        return CausalConv3d(self.out_channels, (3, 3, 3), (1, 1, 1), self.dtype, name="conv_out")(x)


class AutoencoderKLQwenImage(PretrainedModel, nn.Module):
    """diffusers' AutoencoderKLQwenImage for single-frame images. Fields are diffusers' config keys.

    `apply({"params": p}, x, method="encode")` -> (mean, logvar) of shape (B, 1, H/8, W/8, 16) for images
    x (B, 1, H, W, 3) in [-1, 1]; `method="decode"` -> images (B, 1, 8h, 8w, 3), clipped to [-1, 1].
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: Sequence[bool] = (False, True, True)
    input_channels: int = 3
    latents_mean: Sequence[float] = LATENTS_MEAN
    latents_std: Sequence[float] = LATENTS_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    config_keys = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "input_channels",
                   "latents_mean", "latents_std")
    unsupported = {"attn_scales": [], "dropout": 0.0}

    def setup(self):
        self.encoder = Encoder3d(self.base_dim, 2 * self.z_dim, tuple(self.dim_mult), self.num_res_blocks,
                                 tuple(self.temperal_downsample), self.dtype)
        self.quant_conv = CausalConv3d(2 * self.z_dim, (1, 1, 1), dtype=self.dtype)
        self.post_quant_conv = CausalConv3d(self.z_dim, (1, 1, 1), dtype=self.dtype)
        self.decoder = Decoder3d(self.base_dim, tuple(self.dim_mult), self.num_res_blocks,
                                 tuple(self.temperal_downsample)[::-1], self.input_channels, self.dtype)

    @staticmethod
    def _single_frame(x, what):
        if x.ndim != 5 or x.shape[1] != 1:
            raise GlanceError(f"AutoencoderKLQwenImage takes single-frame NTHWC {what} (B, 1, H, W, C), "
                              f"got shape {x.shape}")

    def encode(self, x):
        self._single_frame(x, "images")
        moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        return jnp.clip(self.decode_unclipped(z), -1.0, 1.0)

    def decode_unclipped(self, z):
        """The decoder's output before diffusers' final clip to [-1, 1] (its tiled decoding does not clip)."""
        self._single_frame(z, "latents")
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

    @property
    def spatial_scale(self):
        return 2 ** (len(self.dim_mult) - 1)

    def tiling(self):
        """diffusers' tiling defaults: (tile size, tile stride) in pixels, and the decode method for tiles."""
        return 256, 192, "decode_unclipped"

    def normalize(self, mean):
        """Posterior mean -> the latents the transformer works on: per channel, `(mean - latents_mean) / latents_std`."""
        return (mean - jnp.asarray(self.latents_mean, mean.dtype)) / jnp.asarray(self.latents_std, mean.dtype)

    def denormalize(self, latents):
        """The inverse of `normalize`: transformer latents -> what the decoder takes."""
        return latents * jnp.asarray(self.latents_std, latents.dtype) + jnp.asarray(self.latents_mean, latents.dtype)

    def add_frames(self, x):
        """Images or latents (B, H, W, C) in the layout `encode` / `decode` take: this VAE is video-shaped, one frame."""
        return x[:, None]

    def drop_frames(self, x):
        """The inverse of `add_frames`: (B, 1, H, W, C) -> (B, H, W, C)."""
        return x[:, 0]

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)

    def example_inputs(self):
        return {"x": jnp.zeros((1, 1, 16, 16, self.input_channels), jnp.float32)}

    def to_config(self):
        return {**super().to_config(), "attn_scales": [], "dropout": 0.0}
