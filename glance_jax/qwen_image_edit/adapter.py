"""Qwen-Image-Edit's and Qwen-Image-Edit-2509's answers to what glance_jax asks of a model family (see
glance_jax/family.py).

Both are Qwen-Image's transformer and VAE; what differs is the source image(s): their VAE latents, at about one
megapixel, are packed and appended to the image tokens (their grids follow the image's in `img_shapes`,
`QwenImageTransformer2DModel.conditioning`), and the prompt is encoded by Qwen2.5-VL seeing them through its
vision tower (`prompts.py`, `text_encoder.py`, `vision.py`). Qwen-Image-Edit takes one source image; the 2509
"Plus" model up to three. Their pipeline folders name `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`.
"""

import dataclasses

from glance_jax.family import Family
from glance_jax.qwen_image.adapter import QWEN_IMAGE
from glance_jax.qwen_image_edit.prompts import (QwenImageEditPlusPromptEncoder, QwenImageEditPromptEncoder,
                                                dimensions, vl_image)
from glance_jax.qwen_image_edit.text_encoder import Qwen25VLModel

VAE_AREA = 1024 * 1024  # the pixels both pipelines encode a source image (and make the edit) at


@dataclasses.dataclass(frozen=True, eq=False)
class QwenImageEditFamily(Family):
    """Qwen-Image-Edit: the source images at about one megapixel (multiples of 32), the edit at the last one's."""

    plus: bool = False  # the 2509 model: its prompt sees the images at 384 x 384 and names each ("Picture 1: ")

    def reference_size(self, height, width):
        width, height = dimensions(VAE_AREA, width / height)
        return height, width

    def output_size(self, height, width):
        return self.reference_size(height, width)

    def prompt_images(self, images):
        return [vl_image(image, plus=self.plus) for image in images]


_EDIT = dict(models=(QWEN_IMAGE.transformer, QWEN_IMAGE.vae, Qwen25VLModel), prompt_sees_images=True,
             text_encoders={"text_encoder": ("Qwen2_5_VLForConditionalGeneration", "Qwen25VLModel")})
QWEN_IMAGE_EDIT = QwenImageEditFamily.based_on(
    QWEN_IMAGE, **_EDIT, name="qwen-image-edit", prompt_encoder=QwenImageEditPromptEncoder,
    variants={"qwen-image-edit": {}}, pipelines=("QwenImageEditPipeline",), reference_images=1)
QWEN_IMAGE_EDIT_PLUS = QwenImageEditFamily.based_on(
    QWEN_IMAGE, **_EDIT, name="qwen-image-edit-plus", prompt_encoder=QwenImageEditPlusPromptEncoder,
    variants={"qwen-image-edit-plus": {}}, pipelines=("QwenImageEditPlusPipeline",), reference_images=3, plus=True)
