"""Glance LoRAs for Qwen-Image with the teacher target and guidance distilled into one pass.

    glance-jax train --config configs/qwen_image_teacher.py --workdir runs/qwen_image_teacher \
        --config.model.path=/path/to/Qwen-Image/transformer --config.data.dir=/path/to/one_sample

LoRA (rank 32, alpha 128) on every Dense layer of the blocks ("qwen-image-all"), AdamW lr 1e-4, 600
steps a phase, on 10 points of the 50-step grid fitted to the trajectories (5 slow + 5 fast), trained
towards the base's trajectories drawn with true CFG 5 on the empty prompt and the norm rescale (as the
official Glance-Qwen pipeline samples): the student then samples with ONE pass a step, at no guidance.
The sample needs the empty prompt's encodings (`empty_prompt_embeds`, glance_jax/data.py). Cost of the
trajectories: 64 trajectories x 50 steps x 2 passes = 6,400 forward passes of the base (about 71 TFLOP
each at 1024 x 1024: about 8 minutes of H100 bf16 peak), once; cached beside the encoded sample, reused
by both phases and reruns. Then 2 x 600 train steps (157 TFLOP each). Not measured here (no
accelerator). On the demo's teacher, guidance distilled from one caption did NOT generalise to other
prompts (README, "The demo"): treat the guided student as an experiment.
"""

from glance_jax.recipes import teacher_recipe


def get_config():
    return teacher_recipe("qwen-image", "both")
