"""`glance-jax train`: distil Glance LoRAs from one image and caption, configured by an ml_collections file."""

import sys

from absl import flags
from ml_collections import config_flags

from glance_jax.errors import GlanceError

HELP = """usage: glance-jax train --config CONFIG.py --workdir DIR [--config.FIELD=VALUE ...]

Trains the Slow-LoRA and/or Fast-LoRA of Glance on the one image + caption in
config.data.dir, on the frozen base in config.model.path. Every config field
can be overridden on the command line. Restarting the same command resumes
from the last checkpoint in DIR; a restart with other settings, another sample
or another base is refused (pass --fresh to start anew in DIR).

example:
  glance-jax train --config configs/flux.py:slow --workdir runs/flux \\
      --config.model.path=~/FLUX.1-dev --config.data.dir=~/one_sample --config.optim.lr=1e-4

config.model.path may be a diffusers pipeline folder (model_index.json): its transformer, vae and
text encoders are used; config.model.vae_path / text_encoder_path override its parts.

writes DIR/slow_lora.safetensors and/or DIR/fast_lora.safetensors, DIR/metrics.jsonl, DIR/checkpoints/

on several devices: --config.mesh=data=2,fsdp=4 (the base sharded over fsdp, prompts over data);
on several hosts: the same command on each, plus --distributed (TPU pods, SLURM) or
  --coordinator_address=HOST0:1234 --num_processes=N --process_id=I"""


def main(argv):
    if not argv or "--help" in argv or "-h" in argv:
        print(HELP)
        return
    fv = flags.FlagValues()
    args = ["glance-jax train", *argv]
    config_flags.DEFINE_config_file("config", None, "experiment config file", flag_values=fv, lock_config=True,
                                    sys_argv=args)  # overrides are read from these args, not from sys.argv
    flags.DEFINE_string("workdir", None, "output folder", flag_values=fv)
    flags.DEFINE_bool("fresh", False, "start anew: remove the fingerprint, checkpoints, metrics and LoRA files of a "
                      "previous run in the workdir first", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "join a multi-host run (jax.distributed.initialize; on TPU pods and "
                      "SLURM the addresses are found automatically)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs elsewhere",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes of a multi-host run", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index in a multi-host run", flag_values=fv)
    try:
        rest = fv(args)
    except (flags.Error, OSError, AttributeError, KeyError, ValueError, TypeError) as e:
        raise GlanceError(str(e).strip().splitlines()[-1]) from None
    if len(rest) > 1:
        raise GlanceError(f"unexpected arguments: {' '.join(rest[1:])}")
    if fv.config is None or fv.workdir is None:
        raise GlanceError("both --config and --workdir are required (see glance-jax train --help)")
    if fv.distributed or fv.coordinator_address:
        import jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; accelerators use their own
        kwargs = {}
        if fv.coordinator_address:
            kwargs = dict(coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
                          process_id=fv.process_id)
        jax.distributed.initialize(**kwargs)
    from glance_jax.train import train

    written = train(fv.config, fv.workdir, fresh=fv.fresh)
    for phase, path in written.items():
        print(f"{phase}-LoRA: {path}", file=sys.stdout)
