"""Flax ports of every model Glance uses: the diffusion transformers, their VAEs and their text encoders.

`CLASSES` is the registry the checkpoint loader builds models from: each class under diffusers'
`_class_name` and, for the text encoders, transformers' `architectures` name.
"""

from glance_jax.models.flux import FluxTransformer2DModel
from glance_jax.models.qwen_image import QwenImageTransformer2DModel
from glance_jax.models.qwen_vae import AutoencoderKLQwenImage
from glance_jax.models.text_encoders import CLIPTextModel, Qwen25VLTextModel, T5EncoderModel
from glance_jax.models.vae import AutoencoderKL

__all__ = ["AutoencoderKL", "AutoencoderKLQwenImage", "CLIPTextModel", "FluxTransformer2DModel",
           "Qwen25VLTextModel", "QwenImageTransformer2DModel", "T5EncoderModel"]

_MODELS = (FluxTransformer2DModel, QwenImageTransformer2DModel, AutoencoderKL, AutoencoderKLQwenImage,
           CLIPTextModel, T5EncoderModel, Qwen25VLTextModel)
CLASSES = {**{cls.__name__: cls for cls in _MODELS},
           **{cls.architecture: cls for cls in _MODELS if hasattr(cls, "architecture")}}
