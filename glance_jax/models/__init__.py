"""Flax ports of the diffusion transformers that Glance accelerates."""

from glance_jax.models.flux import FluxTransformer2DModel
from glance_jax.models.qwen_image import QwenImageTransformer2DModel
from glance_jax.models.qwen_vae import AutoencoderKLQwenImage
from glance_jax.models.vae import AutoencoderKL

__all__ = ["AutoencoderKL", "AutoencoderKLQwenImage", "FluxTransformer2DModel", "QwenImageTransformer2DModel"]
