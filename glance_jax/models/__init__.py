"""Every Flax model glance_jax ports, under the names diffusers and transformers give them: the public API
(`from glance_jax.models import FluxTransformer2DModel`). The models live in their families' folders
(glance_jax/flux, glance_jax/qwen_image); `glance_jax.families.load_model` loads a checkpoint of any of them.
"""

from glance_jax.flux.text_encoders import CLIPTextModel, T5EncoderModel
from glance_jax.flux.transformer import FluxTransformer2DModel
from glance_jax.flux.vae import AutoencoderKL
from glance_jax.qwen_image.text_encoder import Qwen25VLTextModel
from glance_jax.qwen_image.transformer import QwenImageTransformer2DModel
from glance_jax.qwen_image.vae import AutoencoderKLQwenImage

__all__ = ["AutoencoderKL", "AutoencoderKLQwenImage", "CLIPTextModel", "FluxTransformer2DModel",
           "Qwen25VLTextModel", "QwenImageTransformer2DModel", "T5EncoderModel"]
