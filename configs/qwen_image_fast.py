"""Glance Fast-LoRA for Qwen-Image: the official recipe (rank 32, alpha 128, AdamW lr 3e-4, 60 steps).

    glance-jax train --config configs/qwen_image_fast.py --workdir runs/qwen_image \
        --config.model.path=/path/to/Qwen-Image/transformer --config.data.dir=/path/to/one_sample

Writes runs/qwen_image/fast_lora.safetensors. Expected run time: not measured yet (no accelerator in this
project's CI); from XLA's FLOP count of the train step, 60 steps are about a minute of compute on one
H100 at 1024x1024. Run both phases with --config.phase=both.
"""

from glance_jax.recipes import official


def get_config():
    return official("qwen-image", "fast")
