"""Glance LoRAs for FLUX.1-dev. `--config configs/flux.py:ARG`, ARG one of:

- `slow`, `fast`, `both`: the official recipe (the paper's data target, rank 16, alpha 64, AdamW lr 5e-4, 60 steps
  a phase, on steps 1, 3, 5, 7, 9 | 11, 21, 31, 41, 50 of the 50-step schedule, an fp8 base);
- `teacher`: the teacher-target recipe the demo's controlled study supports (README, "The demo"), both phases;
- `tiny`: a smoke run for tests (both phases, 12 steps each, a 256-pixel sample, fp32).

    glance-jax train --config configs/flux.py:slow --workdir runs/flux \
        --config.model.path=/path/to/FLUX.1-dev --config.data.dir=/path/to/one_sample

Writes runs/flux/slow_lora.safetensors (`both` and `teacher`: and fast_lora.safetensors), with the schedule in
each file's metadata. Cost in transformer passes: the official recipe is 2 x 60 train steps; `teacher`
integrates 64 trajectories x 50 steps = 3,200 forward passes of the base once (cached beside the encoded
sample), then 2 x 600 train steps. What a step costs in FLOPs and memory at 1024 x 1024, on an fp8 or bf16
base, is measured in docs/results.md ("Quantized bases", "Parity, speed and memory").
"""

from glance_jax.train import default_config


def get_config(arg="both"):
    if arg not in ("slow", "fast", "both", "teacher", "tiny"):
        raise ValueError(f"configs/flux.py:{arg}: use slow, fast, both, teacher or tiny")
    # The defaults are the official recipe (glance_jax.train_config, glance_jax.families: the paper's data
    # target on the official four targets, rank 16, alpha 64, lr 5e-4, 60 steps a phase on the paper's steps).
    c = default_config("flux", arg if arg in ("slow", "fast", "both") else "both")
    c.model.quantize = "fp8"  # as the official code trains: a qfloat8 base (--config.model.quantize=none: bf16)
    if arg == "teacher":
        c.target = "teacher"  # the base's own trajectory: the data target copies the one image (README)
        c.lora.targets = "flux-all"  # every Dense layer inside the blocks; the four attention layers are too few
        c.optim.lr = 1e-4  # higher rates are worse: each step is a one-sample estimate
        c.steps = 600  # gains stop at about 1000 steps
        c.schedule.kind = "fitted"  # fitted beat uniform, which beat the paper's split (half its steps near sigma 1);
        # 5 + 5 points (num_slow, num_fast) of the 50-step grid (teacher.substeps), first half slow
        c.teacher.trajectories = 64  # 8 -> 64 trajectories was the largest single gain
        c.teacher.batch = 4  # noises per compiled call (activation memory at 1024 x 1024)
        c.teacher.guidance_scale = 3.5  # FLUX.1-dev's guidance input, its pipeline's default: one pass a step
        c.model.guidance = 3.5  # the student learns at the guidance it will sample with
    if arg == "tiny":
        c.steps = 12  # enough to see the loss move
        c.model.dtype, c.model.quantize = "fp32", "none"  # exact on CPU
        c.data.resolution = 256  # a small sample
        c.lora.rank, c.lora.alpha = 4, 16.0  # alpha = 4 x rank, as the official recipe
        c.optim.warmup_steps = 2  # a short run
        c.checkpoint.every, c.checkpoint.keep = 4, 2  # several checkpoints to resume from
    return c
