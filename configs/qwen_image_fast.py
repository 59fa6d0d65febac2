"""Glance Fast-LoRA for Qwen-Image: the official recipe (rank 32, alpha 128, AdamW lr 3e-4, 60 steps).

    glance-jax train --config configs/qwen_image_fast.py --workdir runs/qwen_image \
        --config.model.path=/path/to/Qwen-Image/transformer --config.data.dir=/path/to/one_sample

Writes runs/qwen_image/fast_lora.safetensors. The Qwen-Image transformer is not ported yet: this file
records the official recipe, and the trainer refuses it with a clear message until the port lands.
"""

from glance_jax.recipes import official


def get_config():
    return official("qwen-image", "fast")
