"""Flax ports of the diffusion transformers that Glance accelerates."""

from glance_jax.models.flux import FluxTransformer2DModel
from glance_jax.models.qwen_image import QwenImageTransformer2DModel

__all__ = ["FluxTransformer2DModel", "QwenImageTransformer2DModel"]
