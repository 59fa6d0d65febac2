"""`glance-jax export-lora SRC DST --model M`: a LoRA file rewritten in the layout another tool wants.

SRC may be in any layout glance-jax reads (diffusers/PEFT, kohya, ComfyUI);
every key is matched against the model's layers, and the schedule and
guidance metadata of a Glance LoRA travel with it.
"""

import argparse
import os

from glance_jax import checkpoints, families, lora, validation
from glance_jax.errors import GlanceError

EXAMPLE = """example:
  glance-jax export-lora run/slow_lora.safetensors slow_kohya.safetensors --model ~/flux-dev-bf16 --format kohya
  glance-jax export-lora comfy_style.safetensors style_diffusers.safetensors --model ~/FLUX.1-dev/transformer"""


def parser():
    p = validation.ArgumentParser(
        prog="glance-jax export-lora", epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
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


def main(argv):
    args = parser().parse_args(argv)
    validation.output_file(args.dst, args.overwrite, "DST")
    if not args.dst.endswith(".safetensors"):
        raise GlanceError(f"DST {args.dst}: LoRA files are written as .safetensors; name it *.safetensors")
    if not os.path.exists(args.src):
        raise GlanceError(f"{args.src}: no such file or folder")
    model_path = checkpoints.hub.resolve(args.model, "--model", ("transformer",))
    model = checkpoints.model_from_config(checkpoints.open_checkpoint(model_path, families.CLASSES).config,
                                          checkpoints.parse_dtype("fp32"), families.CLASSES)
    tree = lora.load_lora(args.src, checkpoints.abstract_params(model), strict=not args.non_strict)
    lora.save_lora(tree, args.dst, format=args.format, family=families.of(model),
                   schedule=lora.read_schedule(args.src), guidance=lora.read_guidance(args.src))
    print(f"wrote {lora.describe(tree)} to {args.dst} ({args.format} layout)")
