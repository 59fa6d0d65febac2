"""Qwen-Image: the family's transformer, VAE, text encoder, prompt encoding, and its adapter
(`adapter.QWEN_IMAGE`), which answers everything the rest of glance_jax asks of a family."""
