"""FLUX.1's answers to what glance_jax asks of a model family (see glance_jax/family.py)."""

from glance_jax.family import Family, Recipe
from glance_jax.flux import lora_names
from glance_jax.flux.prompts import FluxPromptEncoder
from glance_jax.flux.text_encoders import CLIPTextModel, T5EncoderModel
from glance_jax.flux.transformer import FluxTransformer2DModel
from glance_jax.flux.vae import AutoencoderKL

# diffusers' scheduler_config.json of FLUX.1-dev and -schnell
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
             "base_shift": 0.5, "max_shift": 1.15}


class FluxFamily(Family):
    """FLUX.1: a pooled CLIP vector beside the T5 tokens; FLUX.1-dev takes the guidance scale as an input."""

    def pooled_dim(self, model):
        return model.pooled_projection_dim

    def takes_guidance(self, model):
        return model.guidance_embeds


FLUX = FluxFamily(
    name="flux", transformer=FluxTransformer2DModel, vae=AutoencoderKL, prompt_encoder=FluxPromptEncoder,
    models=(FluxTransformer2DModel, AutoencoderKL, CLIPTextModel, T5EncoderModel),
    text_encoders={"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",)},
    scheduler=SCHEDULER,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    lora_targets_all=(r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|"
                      r"(ff|ff_context)\.net\.(0\.proj|2)|norm1(_context)?\.linear)|"
                      r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|norm\.linear|proj_mlp|proj_out)"),
    text_inputs=("encoder_hidden_states", "pooled_projections"),
    recipe=Recipe(rank=16, lr=5e-4, caption_dropout=0.0),
    guidance_input=True, cfg_rescale=False, masked_text=False,
    variants={"flux-dev": {"guidance_embeds": True}, "flux-schnell": {"guidance_embeds": False}},
    plan_text_tokens=512, default_guidance_scale=3.5, lora_file_names=lora_names, pipelines=("FluxPipeline",),
    consumer_gaps=(
        ("kohya", "diffusers 0.42", "drops", r"x_embedder|context_embedder|time_text_embed\..*|proj_out|norm_out\.linear"),
        ("kohya", "InvokeAI 6.14", "refuses the whole file for",
         r"x_embedder|context_embedder|time_text_embed\..*|norm_out\.linear"),
        ("kohya", "InvokeAI 6.14", "drops", r"proj_out"),
        ("diffusers", "InvokeAI 6.14", "refuses the whole file for", r"norm_out\.linear"),
        ("diffusers", "InvokeAI 6.14", "maps onto no weight", r"time_text_embed\.guidance_embedder\..*")),
    consumer_needs=(
        ("diffusers", "InvokeAI 6.14", ("single_transformer_blocks.0.attn.to_q",
                                        "transformer_blocks.0.attn.add_q_proj")),))
