"""Flax ports of every model Glance uses: the diffusion transformers, their VAEs and their text encoders.

`CLASSES` is the registry the checkpoint loader builds models from: each class under diffusers'
`_class_name` and, for the text encoders, transformers' `architectures` name.
"""

from glance_jax.flux.text_encoders import CLIPTextModel, T5EncoderModel
from glance_jax.flux.transformer import FluxTransformer2DModel
from glance_jax.flux.vae import AutoencoderKL
from glance_jax.qwen_image.text_encoder import Qwen25VLTextModel
from glance_jax.qwen_image.transformer import QwenImageTransformer2DModel
from glance_jax.qwen_image.vae import AutoencoderKLQwenImage

__all__ = ["AutoencoderKL", "AutoencoderKLQwenImage", "CLIPTextModel", "FluxTransformer2DModel",
           "Qwen25VLTextModel", "QwenImageTransformer2DModel", "T5EncoderModel"]

_MODELS = (FluxTransformer2DModel, QwenImageTransformer2DModel, AutoencoderKL, AutoencoderKLQwenImage,
           CLIPTextModel, T5EncoderModel, Qwen25VLTextModel)
CLASSES = {**{cls.__name__: cls for cls in _MODELS},
           **{cls.architecture: cls for cls in _MODELS if hasattr(cls, "architecture")}}
