"""`glance-jax convert SRC DST`: a PyTorch checkpoint becomes a Flax (orbax) folder that loads in seconds.

SRC is a diffusers model folder (config.json + one or sharded .safetensors),
a diffusers pipeline folder (its transformer/ is used) or a Black Forest Labs
FLUX.1 .safetensors file. Tensors are streamed one at a time; DST appears only
once everything is written.
"""

import argparse
import os
import signal
import threading
import time

from tqdm import tqdm

from glance_jax import checkpoints, families, validation
from glance_jax.errors import GlanceError

EXAMPLE = """example:
  glance-jax convert ~/FLUX.1-dev/transformer ~/flux-dev-bf16 --dtype bf16
  glance-jax convert flux1-schnell.safetensors ~/flux-schnell-fp32 --dtype fp32 --overwrite
  glance-jax convert ~/FLUX.1-dev/transformer ~/flux-dev-fp8 --quantize fp8"""


def parser():
    p = validation.ArgumentParser(prog="glance-jax convert", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="diffusers folder or BFL .safetensors file")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bf16", choices=sorted(checkpoints.DTYPES), help="dtype of the stored weights")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quantize", default="none", choices=["none", "fp8", "int8"],
                   help="store the transformer's Dense kernels as 8-bit values with a scale per output channel "
                        "(about half the bf16 size; loads without quantizing again)")
    p.add_argument("--axes_dims_rope", default=None,
                   help="RoPE axes, e.g. 16,56,56; only needed for BFL files whose head dim is not 128")
    return p


def _interrupt_on_sigterm():
    """SIGTERM ends a conversion like Ctrl-C does, so that its scratch folder is removed right away."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv):
    args = parser().parse_args(argv)
    validation.new_folder(args.dst, args.overwrite, "DST")
    if not os.path.exists(args.src):
        raise GlanceError(f"{args.src}: no such file or folder")
    try:
        axes = tuple(int(a) for a in args.axes_dims_rope.split(",")) if args.axes_dims_rope else None
    except ValueError:
        raise GlanceError(f"--axes_dims_rope {args.axes_dims_rope!r}: use comma-separated integers such as "
                          "16,56,56") from None
    start = time.perf_counter()
    bar = lambda names: tqdm(names, desc="converting", unit="tensor", leave=False)
    previous = _interrupt_on_sigterm()
    try:
        model = checkpoints.convert_checkpoint(args.src, args.dst, families.CLASSES, dtype=args.dtype, overwrite=args.overwrite,
                                               axes_dims_rope=axes, progress=bar, quantize=args.quantize)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    stored = args.dtype if args.quantize == "none" else f"{args.quantize} kernels, {args.dtype} otherwise"
    print(f"wrote {type(model).__name__} ({stored}) to {args.dst} in {time.perf_counter() - start:.1f} s")
