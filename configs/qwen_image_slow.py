"""Glance Slow-LoRA for Qwen-Image: the official recipe (rank 32, alpha 128, AdamW lr 3e-4, 60 steps).

    glance-jax train --config configs/qwen_image_slow.py --workdir runs/qwen_image \
        --config.model.path=/path/to/Qwen-Image/transformer --config.data.dir=/path/to/one_sample

Writes runs/qwen_image/slow_lora.safetensors. Expected run time: not measured here (no accelerator).
XLA counts 157 TFLOP per train step at 1024x1024 (benchmarks/qwen_image.py): 60 steps are about 10 s of
H100 bf16 peak, so under a minute at realistic utilisation, plus compilation (9 s on CPU). The base is
fp8, as the official code trains it (optimum-quanto qfloat8): 19.1 GiB instead of 38.1 in bf16; with
--config.model.remat_policy=full the planner puts the step at 29.4 GiB on one device (a 32 GB card). The
official config uses 8-bit Adam; this uses AdamW in fp32 (LoRA + state 2.6 GiB), or with
--config.optim.state_dtype=bf16 bf16 moments.
The sample needs Qwen-Image encodings (glance_jax/data.py). Both phases: --config.phase=both.
"""

from glance_jax.recipes import official


def get_config():
    c = official("qwen-image", "slow")
    c.model.quantize = "fp8"  # as the official code trains: a qfloat8 base (--config.model.quantize=none: bf16)
    return c
