"""Glance LoRAs for FLUX.1-dev with the teacher target: both phases, the recipe the demo's study supports.

    glance-jax train --config configs/flux_teacher.py --workdir runs/flux_teacher \
        --config.model.path=/path/to/FLUX.1-dev/transformer --config.data.dir=/path/to/one_sample

LoRA (rank 16, alpha 64) on every Dense layer of the blocks ("flux-all"), AdamW lr 1e-4, 600 steps a
phase, on 10 points of the 50-step grid fitted to the trajectories, split 5 + 5
(`--config.schedule.kind=uniform`: the base's own 10-step schedule instead), trained towards the base's
own trajectories drawn at guidance 3.5 (FLUX.1-dev's guidance input; the student is trained and samples
at 3.5 too). Cost of the trajectories: 64 trajectories x 50 steps = 3,200 forward passes of the base
(about 74 TFLOP each at 1024 x 1024: about 4 minutes of H100 bf16 peak), once; they are cached beside
the encoded sample, so both phases and reruns reuse them. Then 2 x 600 train steps (165 TFLOP each:
about 3.5 minutes of peak).
Writes runs/flux_teacher/slow_lora.safetensors and fast_lora.safetensors, each with its schedule in
the file's metadata (`glance-jax sample` and `eval` read it). Not measured here (no accelerator).
"""

from glance_jax.recipes import teacher_recipe


def get_config():
    return teacher_recipe("flux", "both")
