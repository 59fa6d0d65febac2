"""`glance-jax train`: distil Glance LoRAs from one image and caption, configured by an ml_collections file."""

import sys

from absl import flags
from ml_collections import config_flags

from glance_jax.errors import GlanceError

HELP = """usage: glance-jax train --config CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]

Trains the Slow-LoRA and/or Fast-LoRA of Glance on the one image + caption in
config.data.dir, on the frozen base in config.model.path. Every config field
can be overridden on the command line. Restarting the same command resumes
from the last checkpoint in DIR.

example:
  glance-jax train --config configs/flux_slow.py --workdir runs/flux \\
      --config.model.path=~/flux-dev-bf16 --config.data.dir=~/one_sample --config.optim.lr=1e-4

writes DIR/slow_lora.safetensors and/or DIR/fast_lora.safetensors, DIR/metrics.jsonl, DIR/checkpoints/"""


def main(argv):
    if not argv or "--help" in argv or "-h" in argv:
        print(HELP)
        return
    fv = flags.FlagValues()
    args = ["glance-jax train", *argv]
    config_flags.DEFINE_config_file("config", None, "experiment config file", flag_values=fv, lock_config=True,
                                    sys_argv=args)  # overrides are read from these args, not from sys.argv
    flags.DEFINE_string("workdir", None, "output folder", flag_values=fv)
    try:
        rest = fv(args)
    except (flags.Error, FileNotFoundError, AttributeError, KeyError, ValueError, TypeError) as e:
        raise GlanceError(str(e).strip().splitlines()[-1]) from None
    if len(rest) > 1:
        raise GlanceError(f"unexpected arguments: {' '.join(rest[1:])}")
    if fv.config is None or fv.workdir is None:
        raise GlanceError("both --config and --workdir are required (see glance-jax train --help)")
    from glance_jax.train import train

    written = train(fv.config, fv.workdir)
    for phase, path in written.items():
        print(f"{phase}-LoRA: {path}", file=sys.stdout)
