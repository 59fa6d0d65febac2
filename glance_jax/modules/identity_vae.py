"""The identity VAE of a model that works on pixels (the demo's teacher): its latents are the image itself.

It answers what the pipelines and the trainer ask of a VAE (`spatial_scale`,
`latent_channels`, encode, decode, latent normalisation, frames, tiling), so
that a pixel-space model samples and trains through the same code as a latent
one and nothing has to tell the two apart.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from glance_jax.modules.base import PretrainedModel

Dtype = Any


class IdentityVAE(PretrainedModel, nn.Module):
    """Images (B, H, W, C) in [-1, 1] are their own latents: one pixel a latent, no parameters."""

    latent_channels: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    config_keys = ("latent_channels",)
    spatial_scale = 1

    def encode(self, x):
        """Posterior (mean, logvar) of images: the images, with zero log-variance."""
        x = x.astype(self.dtype)
        return x, jnp.zeros_like(x)

    def decode(self, z):
        return z.astype(self.dtype)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])

    def example_inputs(self):
        return {"x": jnp.zeros((1, 8, 8, self.latent_channels), jnp.float32)}

    def tiling(self):
        """One tile for any size: there is nothing to save by tiling."""
        return 1 << 30, 1 << 30, "decode"

    def normalize(self, mean):
        return mean

    def denormalize(self, latents):
        return latents

    def add_frames(self, x):
        return x

    def drop_frames(self, x):
        return x
