"""Flax ports of the diffusion transformers that Glance accelerates."""

from glance_jax.models.flux import FluxTransformer2DModel

__all__ = ["FluxTransformer2DModel"]
