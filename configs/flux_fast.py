"""Glance Fast-LoRA for FLUX.1-dev: the official recipe (rank 16, alpha 64, AdamW lr 5e-4, 60 steps).

    glance-jax train --config configs/flux_fast.py --workdir runs/flux \
        --config.model.path=/path/to/FLUX.1-dev/transformer --config.data.dir=/path/to/one_sample

Writes runs/flux/fast_lora.safetensors. Expected run time: not measured here (no accelerator). XLA
counts 165 TFLOP per train step at 1024x1024 (benchmarks/train_step.py): 60 steps are about 10 s of H100
bf16 peak, so under a minute at realistic utilisation, plus compilation (13 s on CPU). Run both
phases at once with --config.phase=both. The base is fp8, as the official code trains it
(optimum-quanto qfloat8): 11.1 GiB instead of 22.2 in bf16; with --config.model.remat_policy=full the
planner puts the step at 18.1 GiB on one device (a 24 GB card).
"""

from glance_jax.recipes import official


def get_config():
    c = official("flux", "fast")
    c.model.quantize = "fp8"  # as the official code trains: a qfloat8 base (--config.model.quantize=none: bf16)
    return c
