"""The model families Glance accelerates, one record each: everything that differs between FLUX.1 and Qwen-Image.

A `Family` names the family's Flax classes (transformer, VAE, prompt encoder,
the text encoders a pipeline folder holds), its scheduler config, its LoRA
presets, its official Glance recipe and how its base samples with guidance.
The rest of glance_jax asks the record (`get(name)`, `of(model)`) instead of
testing class names or parameter keys. The transformer's `conditioning(...)`
method is the one function that turns prompt encodings and a latent grid into
the model's keyword inputs; the prompt encoders of both families return the
same structure (a dict of `prompt_embeds`, `pooled_prompt_embeds` and/or
`prompt_embeds_mask`, the names diffusers' pipelines give these arrays).
"""

import dataclasses
import os

from glance_jax import checkpoints
from glance_jax.errors import GlanceError
from glance_jax.models import (AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel,
                               QwenImageTransformer2DModel)
from glance_jax.flux.prompts import FluxPromptEncoder
from glance_jax.qwen_image.prompts import QwenImagePromptEncoder

# diffusers' scheduler_config.json of the two models Glance targets.
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                  "base_shift": 0.5, "max_shift": 1.15}
QWEN_IMAGE_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                        "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 8192,
                        "base_shift": 0.5, "max_shift": 0.9, "shift_terminal": 0.02,
                        "time_shift_type": "exponential"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The official Glance training recipe's family-specific values (from the official configs)."""

    rank: int
    lr: float
    caption_dropout: float


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One model family. `name` is what configs, schedules and LoRA presets call it. Records are compared (and
    hashed) by identity: there is one of each."""

    name: str
    transformer: type
    vae: type
    prompt_encoder: type
    text_encoders: dict  # pipeline sub-folder -> the config classes accepted there
    scheduler: dict  # diffusers' scheduler_config.json
    # diffusers module-name patterns (PEFT matching: a tuple names modules or dotted suffixes; a string is a
    # regular expression the whole name must match): the official Glance targets, and every Dense layer inside
    # the blocks (not the embedders nor the output layer), what the teacher target needs (README, the demo)
    lora_targets: tuple
    lora_targets_all: str
    recipe: Recipe
    guidance_input: bool  # the base takes guidance as an input, one pass a step (FLUX.1-dev); else true CFG, two
    cfg_rescale: bool  # true CFG rescales to the conditional norm (diffusers' QwenImagePipeline) or not
    masked_text: bool  # text of any length with a mask (padded to a common length) or fixed-length text
    variants: dict  # planner model name -> transformer config overrides of the full-size model
    plan_text_tokens: int  # text tokens the planner assumes
    vae_scale_factor: int = 8  # pixels per latent
    bfl_names: bool = False  # LoRA files may use Black Forest Labs' module names (kohya, ComfyUI)


FLUX = Family(
    name="flux", transformer=FluxTransformer2DModel, vae=AutoencoderKL, prompt_encoder=FluxPromptEncoder,
    text_encoders={"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",)},
    scheduler=FLUX_SCHEDULER,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    lora_targets_all=(r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|"
                      r"(ff|ff_context)\.net\.(0\.proj|2)|norm1(_context)?\.linear)|"
                      r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|norm\.linear|proj_mlp|proj_out)"),
    recipe=Recipe(rank=16, lr=5e-4, caption_dropout=0.0),
    guidance_input=True, cfg_rescale=False, masked_text=False,
    variants={"flux-dev": {"guidance_embeds": True}, "flux-schnell": {"guidance_embeds": False}},
    plan_text_tokens=512, bfl_names=True)

QWEN_IMAGE = Family(
    name="qwen-image", transformer=QwenImageTransformer2DModel, vae=AutoencoderKLQwenImage,
    prompt_encoder=QwenImagePromptEncoder,
    text_encoders={"text_encoder": ("Qwen2_5_VLForConditionalGeneration", "Qwen25VLTextModel")},
    scheduler=QWEN_IMAGE_SCHEDULER,
    lora_targets=("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                  "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"),
    lora_targets_all=(r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|"
                      r"(img|txt)_mlp\.net\.(0\.proj|2)|(img|txt)_mod\.1)"),
    recipe=Recipe(rank=32, lr=3e-4, caption_dropout=0.1),
    guidance_input=False, cfg_rescale=True, masked_text=True, variants={"qwen-image": {}}, plan_text_tokens=128)

FAMILIES = (FLUX, QWEN_IMAGE)
NAMES = tuple(f.name for f in FAMILIES)
VARIANTS = tuple(v for f in FAMILIES for v in f.variants)  # the planner's model names


def get(name):
    """The family called `name` ("flux" or "qwen-image"); a Family passes through."""
    if isinstance(name, Family):
        return name
    for family in FAMILIES:
        if family.name == name:
            return family
    raise GlanceError(f"unknown model family {name!r}: use one of {', '.join(NAMES)}")


def of(model):
    """The family of a transformer (or VAE) instance or class."""
    cls = model if isinstance(model, type) else type(model)
    for family in FAMILIES:
        if issubclass(cls, (family.transformer, family.vae)):
            return family
    raise GlanceError(f"a {cls.__name__} belongs to no model family ({', '.join(NAMES)})")


def of_class_name(name):
    """The family whose transformer a checkpoint's config names (`_class_name`)."""
    for family in FAMILIES:
        if family.transformer.__name__ == name:
            return family
    raise GlanceError(f"{name!r} is the transformer of no model family ({', '.join(NAMES)})")


def of_variant(name):
    """(family, transformer overrides) of a planner model name: "flux-dev", "flux-schnell", "qwen-image"."""
    for family in FAMILIES:
        if name in family.variants:
            return family, family.variants[name]
    raise GlanceError(f"unknown model {name!r}: use one of {', '.join(VARIANTS)}")



def pixels_per_latent(model):
    """Pixels per latent of a transformer: its family's VAE factor, or 1 for a model whose latents are pixels
    (1 or 3 channels, packed 2 x 2: the demo's teacher)."""
    return 1 if model.in_channels // 4 in (1, 3) else of(model).vae_scale_factor


def of_params(tree):
    """The family whose parameter (or LoRA) tree this is, told by the modules only it has; None if they do not tell.

    FLUX is the only family with single-stream blocks and an `x_embedder`; Qwen-Image the only one with per-stream
    modulation and MLPs (`img_mod`, `txt_mlp`, ...) inside its blocks.
    """
    if "x_embedder" in tree or "single_transformer_blocks" in tree:
        return FLUX
    blocks = tree.get("transformer_blocks", {})
    if "img_in" in tree or {"img_mod.1", "txt_mod.1", "img_mlp", "txt_mlp"} & set(blocks):
        return QWEN_IMAGE
    return None


def lora_preset(name):
    """The target patterns of a LoRA preset: a family's name (the official targets) or "<name>-all"."""
    for family in FAMILIES:
        if name == family.name:
            return family.lora_targets
        if name == family.name + "-all":
            return family.lora_targets_all
    presets = [p for f in FAMILIES for p in (f.name, f.name + "-all")]
    raise GlanceError(f"unknown LoRA preset {name!r}; presets: {', '.join(presets)}")


def is_preset(name):
    return isinstance(name, str) and name in [p for f in FAMILIES for p in (f.name, f.name + "-all")]


# ---- the parts of a pipeline folder, checked by the classes their configs name, before anything is loaded ----

def _component(path, component, wanted, what):
    """`path`, or its `component` folder if it is a pipeline folder, after checking it holds one of `wanted`."""
    path = checkpoints.hub.resolve(path, what, (component,))
    parts = checkpoints.pipeline_parts(path)
    if parts is not None:
        if component not in parts:
            raise GlanceError(f"{what} {path}: a pipeline folder without {component}/")
        path = parts[component]
    else:
        path = os.path.expanduser(os.fspath(path))
    held = checkpoints.peek_class(path)
    if held not in wanted:
        raise GlanceError(f"{what} {path} holds {held}, not {' or '.join(wanted)}")
    return path


def transformer_path(path, family=None, what="the model path"):
    """The transformer checkpoint a user's path stands for (a pipeline folder gives its transformer/),
    refused in one line if it holds another kind of model (or another family than `family`)."""
    wanted = tuple(f.transformer.__name__ for f in ([get(family)] if family else FAMILIES))
    return _component(path, "transformer", wanted, what)


def vae_path(path, what="the VAE path"):
    """The VAE folder a user's path stands for (a pipeline folder gives its vae/), checked by its config."""
    return _component(path, "vae", tuple(f.vae.__name__ for f in FAMILIES), what)


def text_encoders_path(path, family, what="the text encoder path"):
    """The pipeline folder holding `family`'s text encoder(s) and tokenizer(s), checked by their configs."""
    family = get(family)
    path = checkpoints.hub.resolve(path, what, text_encoder_parts(family))
    for folder, wanted in family.text_encoders.items():
        sub = os.path.join(path, folder)
        if not os.path.isdir(sub):
            raise GlanceError(f"{what} {path}: no {folder}/ in it (give the pipeline folder that holds "
                              f"{', '.join(family.text_encoders)} and their tokenizers)")
        held = checkpoints.peek_class(sub)
        if held not in wanted:
            raise GlanceError(f"{what} {sub} holds {held}, not {wanted[0]}")
    return path


def text_encoder_parts(family=None):
    """The pipeline sub-folders of `family`'s (or every family's) text encoders and their tokenizers."""
    folders = [f for fam in ([get(family)] if family else FAMILIES) for f in fam.text_encoders]
    return tuple(dict.fromkeys(folders + [f.replace("text_encoder", "tokenizer") for f in folders]))


def local_model_path(path, what="the model path", family=None, vae=None, text_encoders=None):
    """A user's model path on disk: a hub id fetches its transformer, scheduler and the parts not given."""
    needed = ["transformer", "scheduler"] + ([] if vae else ["vae"]) + ([] if text_encoders else
                                                                     list(text_encoder_parts(family)))
    return checkpoints.hub.resolve(path, what, needed)


def model_paths(path, family=None, vae=None, text_encoders=None, what="the model path"):
    """(transformer, vae or None, text encoders or None) for a user's model path: a pipeline folder supplies
    all three; explicitly given `vae` / `text_encoders` paths override its parts. Every path is checked
    for the kind of model it holds before anything is loaded."""
    path = local_model_path(path, what, family, vae, text_encoders)
    parts = checkpoints.pipeline_parts(path) or {}
    transformer = transformer_path(path, family, what)
    if family is None:
        family = of_class_name(checkpoints.peek_class(transformer))
    if vae:
        vae = vae_path(vae)
    elif "vae" in parts:
        vae = vae_path(parts["vae"])
    if text_encoders:
        text_encoders = text_encoders_path(text_encoders, family)
    elif "text_encoder" in parts:
        text_encoders = text_encoders_path(os.path.dirname(parts["text_encoder"]), family)
    return transformer, vae or None, text_encoders or None
