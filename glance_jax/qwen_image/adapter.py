"""Qwen-Image's answers to what glance_jax asks of a model family (see glance_jax/family.py)."""

from glance_jax.family import Family, Recipe
from glance_jax.qwen_image.prompts import QwenImagePromptEncoder
from glance_jax.qwen_image.text_encoder import Qwen25VLTextModel
from glance_jax.qwen_image.transformer import QwenImageTransformer2DModel
from glance_jax.qwen_image.vae import AutoencoderKLQwenImage

# diffusers' scheduler_config.json of Qwen-Image
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 8192,
             "base_shift": 0.5, "max_shift": 0.9, "shift_terminal": 0.02, "time_shift_type": "exponential"}

QWEN_IMAGE = Family(
    name="qwen-image", transformer=QwenImageTransformer2DModel, vae=AutoencoderKLQwenImage,
    prompt_encoder=QwenImagePromptEncoder, models=(QwenImageTransformer2DModel, AutoencoderKLQwenImage,
                                                   Qwen25VLTextModel),
    text_encoders={"text_encoder": ("Qwen2_5_VLForConditionalGeneration", "Qwen25VLTextModel")},
    scheduler=SCHEDULER,
    lora_targets=("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                  "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"),
    lora_targets_all=(r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|"
                      r"(img|txt)_mlp\.net\.(0\.proj|2)|(img|txt)_mod\.1)"),
    text_inputs=("encoder_hidden_states", "encoder_hidden_states_mask"),
    recipe=Recipe(rank=32, lr=3e-4, caption_dropout=0.1),
    guidance_input=False, cfg_rescale=True, masked_text=True, variants={"qwen-image": {}}, plan_text_tokens=128,
    pipelines=("QwenImagePipeline",),
    consumer_gaps=(("kohya", "InvokeAI 6.14", "drops", r"(?!transformer_blocks\.).*"),))
