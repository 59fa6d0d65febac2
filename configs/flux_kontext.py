"""Glance LoRAs for FLUX.1 Kontext, trained on one edit. `--config configs/flux_kontext.py:ARG`, ARG one of:

- `slow`, `fast`, `both`: FLUX.1's official recipe on an edit (the paper's data target on the edited image, the
  source image's latents appended to the image tokens as Kontext reads them; rank 16, alpha 64, AdamW lr 5e-4,
  60 steps a phase on steps 1, 3, 5, 7, 9 | 11, 21, 31, 41, 50 of 50, an fp8 base);
- `teacher`: the teacher target: trajectories of Kontext itself from the source image and the instruction, at its
  pipeline's guidance 3.5 (one pass a step), both phases;
- `tiny`: a smoke run for tests (both phases, 12 steps each, a 256-pixel sample, fp32).

    glance-jax train --config configs/flux_kontext.py:slow --workdir runs/kontext \
        --config.model.path=/path/to/FLUX.1-Kontext-dev --config.data.dir=/path/to/edited \
        --config.data.sources='("/path/to/source",)'

The sample is one edit: data.dir holds the edited image and its instruction (NAME.png, NAME.txt); each folder of
data.sources holds the source image under the same name, of the same size. Writes runs/kontext/slow_lora.safetensors
(`both`, `teacher`: and fast_lora.safetensors), which `glance-jax sample --image` and diffusers'
FluxKontextPipeline.load_lora_weights load. What a step costs at 1024 x 1024 with a 1024 x 1024 source:
docs/results.md ("Editing models").
"""

from glance_jax.train import default_config


def get_config(arg="both"):
    if arg not in ("slow", "fast", "both", "teacher", "tiny"):
        raise ValueError(f"configs/flux_kontext.py:{arg}: use slow, fast, both, teacher or tiny")
    # The defaults are FLUX.1's official recipe (glance_jax.families: Kontext shares FLUX.1's recipe and targets);
    # no official Glance recipe for an editing model exists.
    c = default_config("flux-kontext", arg if arg in ("slow", "fast", "both") else "both")
    c.model.quantize = "fp8"  # as the official code trains FLUX.1: a qfloat8 base
    if arg == "teacher":
        c.target = "teacher"  # Kontext's own trajectories from the source image: the data target copies one edit
        c.lora.targets = "flux-kontext-all"  # every Dense layer inside the blocks, as FLUX.1's teacher recipe
        c.optim.lr = 1e-4  # FLUX.1's teacher recipe (configs/flux.py)
        c.steps = 600
        c.schedule.kind = "fitted"
        c.teacher.trajectories = 64
        c.teacher.batch = 2  # twice the tokens of a text-to-image sample (the source image's): half the batch
        c.teacher.guidance_scale = 3.5  # FluxKontextPipeline's default guidance input: one pass a step
        c.model.guidance = 3.5  # the student learns at the guidance it will sample with
    if arg == "tiny":
        c.steps = 12  # enough to see the loss move
        c.model.dtype, c.model.quantize = "fp32", "none"  # exact on CPU
        c.data.resolution = 256  # a small sample
        c.lora.rank, c.lora.alpha = 4, 16.0  # alpha = 4 x rank, as the official recipe
        c.optim.warmup_steps = 2
        c.checkpoint.every, c.checkpoint.keep = 4, 2
    return c
