"""The `glance-jax` command: `glance-jax SUBCOMMAND --help` explains each one."""

import logging
import sys

from glance_jax.errors import GlanceError, UsageError

USAGE = """usage: glance-jax SUBCOMMAND [ARGS]

subcommands:
  convert      convert a PyTorch FLUX.1 checkpoint (diffusers folder or BFL file) to a Flax folder
  export-lora  rewrite a LoRA file in diffusers/PEFT or kohya layout
  train        distil the Slow-LoRA and Fast-LoRA from one image and caption
  sample       sample one prompt (cached embeddings) with or without Glance LoRAs
  eval         agreement (PSNR, SSIM) and timing of Glance against the base's N-step samples
  plan         per-device memory and FLOPs of a full-size model on a mesh, from abstract shapes
  demo         the whole method on an embedded digits teacher: distil, sample, measure (about 4.5 minutes on 2 cores;
               --edit: on an embedded edit teacher, about 3 minutes)

run 'glance-jax SUBCOMMAND --help' for its arguments."""


def _subcommands():
    from glance_jax import convert, demo, export_lora, plan, sampling_cli, train_cli
    return {"convert": convert.main, "export-lora": export_lora.main, "train": train_cli.main,
            "sample": sampling_cli.sample_main, "eval": sampling_cli.eval_main, "plan": plan.main, "demo": demo.main}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_log = logging.getLogger("glance_jax")  # this package's notes on stderr; other libraries stay quiet
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    try:
        return _run(argv)
    finally:  # main() may be called again in one process (tests, scripts): no handler on an old stderr stays
        package_log.removeHandler(handler)


def _run(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    commands = _subcommands()
    if argv[0] not in commands:
        print(f"glance-jax: error: unknown subcommand {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        commands[argv[0]](argv[1:])
    except GlanceError as e:
        print(f"glance-jax {argv[0]}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:  # a full disk, a folder made read-only mid-run: one line, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"glance-jax {argv[0]}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"glance-jax {argv[0]}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
