"""Qwen-Image-Edit's prompt encoding, as diffusers 0.42's QwenImageEditPipeline / QwenImageEditPlusPipeline
`encode_prompt`: the instruction inside the pipeline's chat template with its image(s) in the prompt, Qwen2.5-VL's
final hidden states of the real tokens with the first 64 (template) tokens dropped, right-padded with zeros to the
longest prompt, and the mask of real tokens (only when some prompt is padded).

- Edit (Qwen-Image-Edit): one image per prompt, `<|vision_start|><|image_pad|><|vision_end|>` before the
  instruction in the template.
- Plus (Qwen-Image-Edit-2509 and later): a list of images per prompt (the model was trained on 1 to 3), each
  announced as "Picture N: <|vision_start|><|image_pad|><|vision_end|>" before the instruction.

The images given are those the pipeline hands to `encode_prompt`: `vl_image` makes them from the user's
images as each pipeline's `__call__` does (a LANCZOS resize to about 1024 x 1024 pixels for Edit, 384 x 384 for
Plus, each side a multiple of 32); the processor then resizes them again to multiples of 28 (`processor.py`).

Positions: Qwen2.5-VL's multimodal RoPE (`mrope=True`, what the model was trained with, and what transformers 4
computes). Under transformers >= 5, diffusers 0.42 does not pass the processor's `mm_token_type_ids` to the text
encoder, which then counts positions 0 .. T - 1 over image tokens as over text (diffusers issue #14194);
`mrope=False` reproduces that.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from glance_jax.checkpoints import hub
from glance_jax.errors import GlanceError
from glance_jax.prompts import load_tokenizer, subfolder
from glance_jax.qwen_image_edit.processor import QwenVLImageProcessor, expand_image_pads
from glance_jax.qwen_image_edit.text_encoder import Qwen25VLModel, sequential_positions

_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
           "background), then explain how the user's text instruction should alter or modify the image. Generate a "
           "new image that meets the user's requirements while maintaining consistency with the original input "
           "where appropriate.<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = _SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_TEMPLATE = _SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
EDIT_TEMPLATE_TOKENS = 64  # diffusers' prompt_template_encode_start_idx, both pipelines
PLUS_TEMPLATE_TOKENS = 64
EDIT_VL_AREA = 1024 * 1024  # the pixels of the image the Edit pipeline hands to the processor
PLUS_VL_AREA = 384 * 384  # the Plus pipeline's CONDITION_IMAGE_SIZE


def dimensions(area, ratio):
    """diffusers' `calculate_dimensions`: (width, height) of about `area` pixels at `ratio`, multiples of 32."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def vl_image(image, plus=False):
    """The image (PIL) the Edit (`plus=False`) or Plus pipeline gives its processor for a user's PIL image."""
    from PIL import Image

    width, height = dimensions(PLUS_VL_AREA if plus else EDIT_VL_AREA, image.width / image.height)
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def _is_image(value):
    return hasattr(value, "getbands")  # a PIL image


class QwenImageEditPromptEncoder:
    """{"prompt_embeds": (B, T, 3584), "prompt_embeds_mask": (B, T), only if some prompt is padded}."""

    def __init__(self, encoder, tokenizer, processor, plus=False, mrope=True):
        self.encoder, self.tokenizer, self.processor = encoder, tokenizer, processor
        self.plus, self.mrope = plus, mrope
        model = encoder[0]
        self._encode = jax.jit(lambda p, ids, mask, pixels, positions, grids: model.apply(
            {"params": p}, ids, mask, pixels, grids, positions), static_argnums=5)

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, plus=False, mrope=True):
        """From a Qwen-Image-Edit pipeline folder (or hub id): text_encoder/, and processor/ (its tokenizer and
        preprocessor_config.json, as diffusers' processor reads them; tokenizer/ where processor/ has none)."""
        path = hub.resolve(path, "the text encoder path", ("text_encoder", "tokenizer", "processor"))
        processor = subfolder(path, "processor")
        has_tokenizer = any(os.path.isfile(os.path.join(processor, name))
                            for name in ("tokenizer_config.json", "tokenizer.json", "vocab.json"))
        tokenizer = load_tokenizer(processor if has_tokenizer else subfolder(path, "tokenizer"))
        return cls(Qwen25VLModel.from_pretrained(os.path.join(path, "text_encoder"), dtype), tokenizer,
                   QwenVLImageProcessor.from_pretrained(processor), plus, mrope)

    def _images_per_prompt(self, images, count):
        """A list of images for each prompt. Edit: one image (for every prompt) or one per prompt. Plus: one
        image or a list (for every prompt), or a list of lists (one per prompt)."""
        if images is None:
            return [[] for _ in range(count)]
        if _is_image(images):
            return [[images] for _ in range(count)]
        images = list(images)
        if self.plus and all(_is_image(image) for image in images):
            return [images for _ in range(count)]
        if not self.plus and len(images) == 1 and _is_image(images[0]):
            return [images for _ in range(count)]
        if len(images) != count:
            raise GlanceError(f"{len(images)} images (or lists of images) for {count} prompts")
        per_prompt = [[image] if _is_image(image) else list(image) for image in images]
        if not self.plus and any(len(group) != 1 for group in per_prompt):
            raise GlanceError("Qwen-Image-Edit takes one image per prompt (Plus takes lists)")
        if not all(_is_image(image) for group in per_prompt for image in group):
            raise GlanceError("images must be PIL images")
        return per_prompt

    def text(self, prompt, images):
        """The prompt inside the pipeline's template, one `<|image_pad|>` per image (before expansion)."""
        if not self.plus:
            return EDIT_TEMPLATE.format(prompt)
        return PLUS_TEMPLATE.format("".join(PLUS_PICTURE.format(i + 1) for i in range(len(images))) + prompt)

    def __call__(self, prompts, images=None):
        """Encodes `prompts` with their images (PIL, as `encode_prompt` takes them: see `vl_image`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = self._images_per_prompt(images, len(prompts))
        texts = [self.text(p, group) for p, group in zip(prompts, per_prompt)]
        flat = [image for group in per_prompt for image in group]
        pixels, grids = self.processor(flat) if flat else (None, ())
        texts = expand_image_pads(texts, grids, self.processor.merge_size)
        batch = self.tokenizer(texts, padding=True, return_tensors="np")
        ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
        model = self.encoder[0]
        positions = model.positions(ids, mask, grids) if self.mrope else sequential_positions(*ids.shape)
        hidden = np.asarray(self._encode(self.encoder[1], ids, mask, pixels, positions, grids))
        drop = PLUS_TEMPLATE_TOKENS if self.plus else EDIT_TEMPLATE_TOKENS
        kept = [h[m.astype(bool)][drop:] for h, m in zip(hidden, mask)]
        length = max(len(k) for k in kept)
        embeds = np.stack([np.concatenate([k, np.zeros((length - len(k), k.shape[1]), k.dtype)]) for k in kept])
        out_mask = np.stack([np.arange(length) < len(k) for k in kept]).astype(np.int32)
        encodings = {"prompt_embeds": jnp.asarray(embeds)}
        if not out_mask.all():
            encodings["prompt_embeds_mask"] = jnp.asarray(out_mask)
        return encodings


class QwenImageEditPlusPromptEncoder(QwenImageEditPromptEncoder):
    """Qwen-Image-Edit-2509's prompts ("Plus"): up to three pictures, each named in the template."""

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, plus=True, mrope=True):
        return super().from_pretrained(path, dtype, plus, mrope)
