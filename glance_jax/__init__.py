"""glance_jax: Glance (Slow-LoRA / Fast-LoRA few-step sampling) for FLUX.1 and Qwen-Image in JAX."""

__version__ = "0.1.0"
