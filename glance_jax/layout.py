"""How arrays are laid out, for every family alike: block stacks in parameter trees, and latents packed into tokens.

A transformer's repeated blocks are stacked on a leading axis (one scanned
module); diffusers' DiTs name their block lists `...blocks` (`transformer_blocks`,
FLUX.1's single-stream blocks, Wan's `blocks`), so a top-level
module of that name holds one slice per block and its PyTorch names carry the
index (`transformer_blocks.3.attn.to_q`). Latents (B, H, W, C) become tokens
in 2 x 2 patches, channels ordered (c, dy, dx), as diffusers' FLUX.1 and
Qwen-Image pipelines pack them.
"""

import numpy as np

from glance_jax.errors import GlanceError

PATCH = 2  # latents per token along each side


def is_block_stack(name):
    """Whether a top-level module of a parameter tree is a stack of blocks (leading axis = block index)."""
    return name.endswith("blocks")


def latent_grid(height, width, vae_scale_factor):
    """(rows, columns) of tokens for an image of `height` x `width` pixels and a VAE of `vae_scale_factor`."""
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in (height, width)):
        raise GlanceError(f"height and width must be positive integers, got {height!r}x{width!r}")
    step = PATCH * vae_scale_factor
    if height % step or width % step:
        raise GlanceError(f"height and width must be multiples of {step}, got {height}x{width}")
    return height // step, width // step


def pack_latents(latents):
    """(B, H, W, C) latents -> (B, H/2 * W/2, 4C) tokens."""
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens, height, width, vae_scale_factor):
    """Inverse of `pack_latents` for an image of `height` x `width` pixels: (B, H/f, W/f, C)."""
    rows, cols = latent_grid(height, width, vae_scale_factor)
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, rows, cols, c, PATCH, PATCH).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, rows * PATCH, cols * PATCH, c)
