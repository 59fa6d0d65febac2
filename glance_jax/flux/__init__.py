"""FLUX.1 (dev and schnell): the family's transformer, VAE, text encoders, prompt encoding, Black Forest Labs'
checkpoint names, and its adapter (`adapter.FLUX`), which answers everything the rest of glance_jax asks of a family."""
