"""Glance Fast-LoRA for FLUX.1-dev: the official recipe (rank 16, alpha 64, AdamW lr 5e-4, 60 steps).

    glance-jax train --config configs/flux_fast.py --workdir runs/flux \
        --config.model.path=/path/to/FLUX.1-dev/transformer --config.data.dir=/path/to/one_sample

Writes runs/flux/fast_lora.safetensors. Expected run time: not measured yet (no accelerator in this
project's CI); from XLA's FLOP count of the train step, 60 steps are about a minute of compute on one
H100 at 1024x1024. Run both phases with --config.phase=both.
"""

from glance_jax.recipes import official


def get_config():
    return official("flux", "fast")
