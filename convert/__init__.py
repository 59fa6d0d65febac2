"""Command-line converters from PyTorch checkpoints to Flax (orbax) folders: `glance-jax convert`."""
