"""Glance LoRAs for Qwen-Image. `--config configs/qwen_image.py:ARG`, ARG one of:

- `slow`, `fast`, `both`: the official recipe (the paper's data target, rank 32, alpha 128, AdamW lr 3e-4, 60
  steps a phase, caption dropout 0.1, on steps 1, 3, 5, 7, 9 | 11, 21, 31, 41, 50 of 50, an fp8 base);
- `teacher`: the teacher target for a pair that samples as the official Glance-Qwen pipeline does, with true
  CFG 5 on the empty prompt (two LoRA'd passes a step, norm rescale), both phases;
- `teacher_onepass`: the same teacher, with the guidance distilled into one pass a step (an experiment: on the
  demo's teacher such students do not generalise to other prompts, docs/results.md).

    glance-jax train --config configs/qwen_image.py:slow --workdir runs/qwen_image \
        --config.model.path=/path/to/Qwen-Image --config.data.dir=/path/to/one_sample

Writes runs/qwen_image/slow_lora.safetensors (`both` and the teacher recipes: and fast_lora.safetensors), with
the schedule and the guidance regime (true CFG scale, negative prompt, passes a step) in each file's metadata,
where `glance-jax sample` and `eval` find them. The sample needs Qwen-Image encodings (glance_jax/data.py), the
teacher recipes also the empty prompt's (`empty_prompt_embeds`).

Cost, counted in transformer passes: `teacher` integrates 64 trajectories x 50 steps x 2 passes = 6,400 forward
passes of the base once (cached), then 2 x 600 train steps of two passes each (caption and negative prompt);
`teacher_onepass` has the same trajectories and train steps of one pass. The official recipe is 2 x 60 one-pass
steps. FLOPs and memory a pass and a step at 1024 x 1024: docs/results.md.
"""

from glance_jax.train import default_config


def get_config(arg="both"):
    if arg not in ("slow", "fast", "both", "teacher", "teacher_onepass"):
        raise ValueError(f"configs/qwen_image.py:{arg}: use slow, fast, both, teacher or teacher_onepass")
    # The defaults are the official recipe (glance_jax.train_config, glance_jax.families: the paper's data
    # target on the twelve official targets, rank 32, alpha 128, lr 3e-4, caption dropout 0.1 on the empty prompt
    # " ", 60 steps a phase on the paper's steps). Adam's moments stay fp32 where the official config uses 8-bit
    # Adam: --config.optim.state_dtype=bf16 halves them (2.6 GiB here).
    c = default_config("qwen-image", arg if arg in ("slow", "fast", "both") else "both")
    c.model.quantize = "fp8"  # as the official code trains: a qfloat8 base (--config.model.quantize=none: bf16)
    if arg in ("teacher", "teacher_onepass"):
        c.target = "teacher"  # the base's own trajectory: the data target copies the one image (README)
        c.lora.targets = "qwen-image-all"  # every Dense layer inside the blocks
        c.optim.lr = 1e-4  # higher rates are worse: each step is a one-sample estimate
        c.steps = 600  # gains stop at about 1000 steps
        c.schedule.kind = "fitted"  # fitted beat uniform, which beat the paper's split; 5 + 5 points (num_slow,
        # num_fast) of the 50-step grid (teacher.substeps), first half slow
        c.teacher.trajectories = 64  # 8 -> 64 trajectories was the largest single gain
        c.teacher.batch = 4  # noises per compiled call (activation memory at 1024 x 1024)
        c.teacher.guidance_scale = 5.0  # true CFG on the empty prompt with the norm rescale, as the official
        # Glance-Qwen pipeline samples (two passes a step)
        c.data.caption_dropout = 0.0  # the teacher target learns the guided trajectory of its caption
    if arg == "teacher":
        c.student.guidance_scale = 5.0  # the pair samples as the official pipeline does, true CFG 5 (two passes
        # a step), on the default negative prompt " " (the sample's empty_prompt_embeds): its velocity over both
        # LoRA'd passes is trained to the guided teacher's jump
    return c
