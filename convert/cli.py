"""`glance-jax convert SRC DST`: a PyTorch checkpoint becomes a Flax (orbax) folder that loads in seconds.

SRC is a diffusers model folder (config.json + one or sharded .safetensors),
a diffusers pipeline folder (its transformer/ is used) or a Black Forest Labs
FLUX.1 .safetensors file. Tensors are streamed one at a time; DST appears only
once everything is written.
"""

import argparse
import time

from tqdm import tqdm

from glance_jax import checkpoints

EXAMPLE = """example:
  glance-jax convert ~/FLUX.1-dev/transformer ~/flux-dev-bf16 --dtype bf16
  glance-jax convert flux1-schnell.safetensors ~/flux-schnell-fp32 --dtype fp32 --overwrite"""


def parser():
    p = argparse.ArgumentParser(prog="glance-jax convert", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="diffusers folder or BFL .safetensors file")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bf16", choices=sorted(checkpoints.DTYPES), help="dtype of the stored weights")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--axes_dims_rope", default=None,
                   help="RoPE axes, e.g. 16,56,56; only needed for BFL files whose head dim is not 128")
    return p


def main(argv):
    args = parser().parse_args(argv)
    axes = tuple(int(a) for a in args.axes_dims_rope.split(",")) if args.axes_dims_rope else None
    start = time.perf_counter()
    bar = lambda names: tqdm(names, desc="converting", unit="tensor", leave=False)
    model = checkpoints.convert_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                           axes_dims_rope=axes, progress=bar)
    print(f"wrote {type(model).__name__} ({args.dtype}) to {args.dst} in {time.perf_counter() - start:.1f} s")
