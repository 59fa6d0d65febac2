"""Glance LoRAs for Qwen-Image-Edit (or -2509, "Plus"), trained on one edit. `--config configs/qwen_image_edit.py:ARG`,
ARG one of:

- `slow`, `fast`, `both`: Qwen-Image's official recipe on an edit (the paper's data target on the edited image, the
  source image's latents appended to the image tokens and the instruction encoded seeing it, as the appendix
  describes; rank 32, alpha 128, AdamW lr 3e-4, 60 steps a phase, caption dropout 0.1, on steps 1, 3, 5, 7, 9 |
  11, 21, 31, 41, 50 of 50, an fp8 base);
- `teacher`: the teacher target: trajectories of the edit model itself from the source image and the instruction,
  guided as its pipeline samples (true CFG 4 on the empty prompt, norm rescale, two passes a step), and a pair
  that samples the same way, both phases.

    glance-jax train --config configs/qwen_image_edit.py:slow --workdir runs/qwen_edit \
        --config.model.path=/path/to/Qwen-Image-Edit --config.data.dir=/path/to/edited \
        --config.data.sources='("/path/to/source",)'

For Qwen-Image-Edit-2509 add --config.family=qwen-image-edit-plus (and up to three source folders). The sample is
one edit: data.dir holds the edited image and its instruction (NAME.png, NAME.txt); each folder of data.sources
holds a source image under the same name, of the same size. The instruction is encoded by Qwen2.5-VL seeing the
source images (config.model.text_encoder_path, or the pipeline folder's text_encoder/ and processor/). Writes
runs/qwen_edit/slow_lora.safetensors (`both`, `teacher`: and fast_lora.safetensors), which `glance-jax sample
--image` and diffusers' QwenImageEditPipeline.load_lora_weights load. What a step costs at 1024 x 1024 with a
1024 x 1024 source: docs/results.md ("Editing models").
"""

from glance_jax.train import default_config


def get_config(arg="both"):
    if arg not in ("slow", "fast", "both", "teacher"):
        raise ValueError(f"configs/qwen_image_edit.py:{arg}: use slow, fast, both or teacher")
    # The defaults are Qwen-Image's official recipe (the edit families share its recipe and targets); no official
    # Glance recipe for an editing model was released.
    c = default_config("qwen-image-edit", arg if arg in ("slow", "fast", "both") else "both")
    c.model.quantize = "fp8"  # as the official code trains Qwen-Image: a qfloat8 base
    if arg == "teacher":
        c.target = "teacher"  # the edit model's own trajectories: the data target copies the one edit
        c.lora.targets = "qwen-image-edit-all"  # every Dense layer inside the blocks, as Qwen-Image's teacher recipe
        c.optim.lr = 1e-4  # Qwen-Image's teacher recipe (configs/qwen_image.py)
        c.steps = 600
        c.schedule.kind = "fitted"
        c.teacher.trajectories = 64
        c.teacher.batch = 2  # twice the image tokens of a text-to-image sample (the source's): half the batch
        c.teacher.guidance_scale = 4.0  # QwenImageEditPipeline's default true_cfg_scale, on the empty prompt
        c.data.caption_dropout = 0.0  # the teacher target learns the guided trajectory of its instruction
        c.student.guidance_scale = 4.0  # the pair samples as the pipeline does: true CFG 4, two passes a step
    return c
