"""Tiled VAE decoding, exactly as diffusers tiles and blends, so that peak memory follows the tile."""

import jax
import jax.numpy as jnp
import numpy as np


def tiled_decode(vae, params, z, tile_sample_size=None, tile_sample_stride=None):
    """Decodes latents tile by tile exactly as diffusers' tiled decoding does, so peak memory follows the tile.

    Works for both VAEs (spatial axes of NHWC or NTHWC latents). Latent tiles
    of tile_sample_size / 8 step by tile_sample_stride / 8; each decoded tile
    is cross-faded into its upper and left neighbours over
    (size - stride) pixels and cropped to the stride. Defaults are diffusers':
    FLUX.1's VAE: size = sample_size (1024), stride = 3/4 of it;
    Qwen-Image's VAE: 256 and 192, decoded without the final clip, as
    diffusers' tiled path does. Latents no larger than a tile are decoded whole.
    """
    size, stride, method = vae.tiling()
    size, stride = tile_sample_size or size, tile_sample_stride or stride
    scale = vae.spatial_scale
    tile, step = size // scale, stride // scale
    axes = (z.ndim - 3, z.ndim - 2)  # H and W
    h, w = z.shape[axes[0]], z.shape[axes[1]]
    decode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=method))
    if h <= tile and w <= tile:
        return vae.apply({"params": params}, z, method="decode")
    def crop(i, j):
        index = [slice(None)] * z.ndim
        index[axes[0]], index[axes[1]] = slice(i, i + tile), slice(j, j + tile)
        return z[tuple(index)]

    rows = [[np.array(decode(params, crop(i, j))) for j in range(0, w, step)] for i in range(0, h, step)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, t in enumerate(row):  # blended in place: later tiles blend with already-blended neighbours
            if i > 0:
                _blend(rows[i - 1][j], t, size - stride, axes[0])
            if j > 0:
                _blend(row[j - 1], t, size - stride, axes[1])
        out_rows.append(np.concatenate([_keep(t, stride, axes) for t in row], axis=axes[1]))
    out = np.concatenate(out_rows, axis=axes[0])
    return jnp.asarray(_keep(out, (h * scale, w * scale), axes))


def _keep(x, n, axes):
    n = (n, n) if isinstance(n, int) else n
    index = [slice(None)] * x.ndim
    index[axes[0]], index[axes[1]] = slice(0, n[0]), slice(0, n[1])
    return x[tuple(index)]


def _blend(a, b, extent, axis):
    """Linear cross-fade of the end of tile `a` into the start of tile `b` along `axis`, in place in `b`."""
    n = min(a.shape[axis], b.shape[axis], extent)
    w = (np.arange(n) / n).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    head = [slice(None)] * a.ndim
    head[axis] = slice(0, n)
    tail = [slice(None)] * a.ndim
    tail[axis] = slice(a.shape[axis] - n, None)
    b[tuple(head)] = a[tuple(tail)] * (1 - w) + b[tuple(head)] * w
