"""`glance-jax convert SRC DST`: a PyTorch checkpoint becomes a Flax (orbax) folder that loads in seconds.

SRC is a diffusers model folder (config.json + one or sharded .safetensors),
a diffusers pipeline folder (its transformer/ is used) or a Black Forest Labs
FLUX.1 .safetensors file. Tensors are streamed one at a time; DST appears only
once everything is written.
"""

import argparse
import os
import time

from tqdm import tqdm

from glance_jax import checkpoints, families, validation

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
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv):
    import signal

    from glance_jax.errors import GlanceError

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
        model = checkpoints.convert_checkpoint(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                                               axes_dims_rope=axes, progress=bar, quantize=args.quantize)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    stored = args.dtype if args.quantize == "none" else f"{args.quantize} kernels, {args.dtype} otherwise"
    print(f"wrote {type(model).__name__} ({stored}) to {args.dst} in {time.perf_counter() - start:.1f} s")


EXPORT_EXAMPLE = """example:
  glance-jax export-lora run/slow_lora.safetensors slow_kohya.safetensors --model ~/flux-dev-bf16 --format kohya
  glance-jax export-lora comfy_style.safetensors style_diffusers.safetensors --model ~/FLUX.1-dev/transformer"""


def export_lora_parser():
    p = validation.ArgumentParser(
        prog="glance-jax export-lora", epilog=EXPORT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rewrites a LoRA (diffusers/PEFT, kohya or ComfyUI layout) in the layout other tools want. "
                    "Every key is matched against the model's layers; nothing is skipped silently.")
    p.add_argument("src", help="LoRA .safetensors file (or a diffusers/PEFT LoRA folder)")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", required=True,
                   help="the base model the LoRA is for (any checkpoint glance-jax loads; only its config is read)")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"])
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--non_strict", action="store_true", help="leave out (and list) keys that match no layer")
    return p


def export_lora_main(argv):
    from glance_jax import lora
    from glance_jax.errors import GlanceError

    args = export_lora_parser().parse_args(argv)
    validation.output_file(args.dst, args.overwrite, "DST")
    if not args.dst.endswith(".safetensors"):
        raise GlanceError(f"DST {args.dst}: LoRA files are written as .safetensors; name it *.safetensors")
    if not os.path.exists(args.src):
        raise GlanceError(f"{args.src}: no such file or folder")
    checkpoint = checkpoints.open_checkpoint(checkpoints.hub.resolve(args.model, "--model", ("transformer",)))
    model = checkpoints.model_from_config(checkpoint.config, checkpoints.parse_dtype("fp32"))
    tree = lora.load_lora(args.src, checkpoints.abstract_params(model), strict=not args.non_strict)
    lora.save_lora(tree, args.dst, format=args.format, model_type=families.of(model).name,
                   schedule=lora.read_schedule(args.src), guidance=lora.read_guidance(args.src))
    print(f"wrote {lora.describe(tree)} to {args.dst} ({args.format} layout)")
