"""What a model family answers: the `Family` record each family folder fills in once (its `adapter.py`).

Everything that differs between FLUX.1, Qwen-Image and the next family is a
field or a method here; the pipelines, the trainer, the planner, the data
and the commands ask it (through `glance_jax.families`) and never test class
names, parameter keys or channel counts. Latents are packed 2 x 2 into tokens
(`glance_jax.layout`) by default; a family that packs otherwise overrides the
latent methods.
"""

import dataclasses

import jax.numpy as jnp

from glance_jax import layout, lora_tree
from glance_jax.errors import GlanceError


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The official Glance training recipe's family-specific values (from the official configs)."""

    rank: int
    lr: float
    caption_dropout: float


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One model family; records are compared (and hashed) by identity: there is one of each."""

    name: str  # what configs, schedules, LoRA presets and the CLI call it
    transformer: type
    vae: type
    prompt_encoder: type
    models: tuple  # every Flax model class of the family: the loader builds a checkpoint's model from these
    text_encoders: dict  # pipeline sub-folder -> the config classes accepted there
    scheduler: dict  # diffusers' scheduler_config.json
    # diffusers module-name patterns (PEFT matching: a tuple names modules or dotted suffixes; a string is a
    # regular expression the whole name must match): the official Glance targets, and every Dense layer inside
    # the blocks (not the embedders nor the output layer), what the teacher target needs
    lora_targets: tuple
    lora_targets_all: str
    text_inputs: tuple  # the model's keyword inputs that carry the prompt (one set per caption)
    recipe: Recipe
    guidance_input: bool  # the base takes guidance as an input, one pass a step (FLUX.1-dev); else true CFG, two
    cfg_rescale: bool  # true CFG rescales to the conditional norm (diffusers' QwenImagePipeline) or not
    masked_text: bool  # text of any length with a mask (padded to a common length) or fixed-length text
    variants: dict  # planner model name -> transformer config overrides of the full-size model
    plan_text_tokens: int  # text tokens the planner assumes
    vae_scale_factor: int = 8  # pixels per latent of the family's VAE
    default_guidance_scale: float | None = None  # a guidance-distilled model's guidance input by default
    # other tools' module names in LoRA files (a module: see glance_jax/flux/lora_names.py), or None
    lora_file_names: object = None
    # what real LoRA consumers drop or refuse (tests/test_consumers.py): (format, consumer, what it does,
    # regular expression over diffusers module names), and (format, consumer, modules it needs to take a file)
    consumer_gaps: tuple = ()
    consumer_needs: tuple = ()
    # diffusers pipeline classes (model_index.json's `_class_name`) of this family: how a pipeline folder tells
    # an editing model (FLUX.1 Kontext) from the text-to-image model whose transformer class it shares
    pipelines: tuple = ()
    reference_images: int = 0  # source images an editing model takes (their latents follow the image tokens)
    prompt_sees_images: bool = False  # the prompt encoder takes the source images too (Qwen-Image-Edit)

    @classmethod
    def based_on(cls, family, **changes):
        """A record of this class with `family`'s answers but `changes` (an editing family on its base's models)."""
        return cls(**{**{f.name: getattr(family, f.name) for f in dataclasses.fields(family)}, **changes})

    # ---- latents ----

    def latent_grid(self, height, width, vae_scale_factor):
        """(rows, columns) of tokens for an image of `height` x `width` pixels."""
        return layout.latent_grid(height, width, vae_scale_factor)

    def pack_latents(self, latents):
        """(B, H, W, C) latents -> (B, tokens, D) the transformer takes."""
        return layout.pack_latents(latents)

    def unpack_latents(self, tokens, height, width, vae_scale_factor):
        """(B, tokens, D) -> (B, H, W, C) latents of an image of `height` x `width` pixels."""
        return layout.unpack_latents(tokens, height, width, vae_scale_factor)

    def token_grid(self, latents):
        """(rows, columns) of the tokens `pack_latents(latents)` gives (`latents`: an array or its shape)."""
        shape = getattr(latents, "shape", latents)
        return shape[-3] // layout.PATCH, shape[-2] // layout.PATCH

    def latent_channels(self, model):
        """Channels of the latents (before packing) that `model` denoises."""
        return model.in_channels // (layout.PATCH * layout.PATCH)

    # ---- editing: the source images ----

    def reference_size(self, height, width):
        """(height, width) in pixels that a source image of `height` x `width` is resized to before VAE encoding."""
        step = layout.PATCH * self.vae_scale_factor
        return height // step * step, width // step * step

    def output_size(self, height, width):
        """(height, width) of an edit of a `height` x `width` source image when no size is asked for."""
        return self.reference_size(height, width)

    def prompt_images(self, images):
        """The source images (PIL) as the prompt encoder is handed them (`prompt_sees_images`), resized as the
        family's diffusers pipeline resizes them for it."""
        return images

    # ---- text and conditioning ----

    def text_dim(self, model):
        """Width of the prompt embeddings `model` takes."""
        return model.joint_attention_dim

    def pooled_dim(self, model):
        """Width of the pooled prompt vector `model` takes, or None if it takes none."""
        return None

    def takes_guidance(self, model):
        """Whether `model` takes the guidance scale as an input (a guidance-distilled model)."""
        return False

    def conditioning(self, model, encodings, rows, cols, guidance=1.0):
        """(keyword inputs, static inputs) of `model` besides hidden_states and timestep, from prompt encodings
        (diffusers' names: `prompt_embeds`, ...) and a rows x cols token grid."""
        return model.conditioning(encodings, rows, cols, guidance)

    def example_encodings(self, model, batch, text_tokens):
        """Zero prompt encodings of `batch` prompts of `text_tokens` tokens, in `model`'s dtype (with an all-ones
        mask where text comes masked): what the planner traces the model with."""
        encodings = {"prompt_embeds": jnp.zeros((batch, text_tokens, self.text_dim(model)), model.dtype)}
        if self.pooled_dim(model):
            encodings["pooled_prompt_embeds"] = jnp.zeros((batch, self.pooled_dim(model)), model.dtype)
        if self.masked_text:
            encodings["prompt_embeds_mask"] = jnp.ones((batch, text_tokens), jnp.int32)
        return encodings

    def add_guidance_embedder(self, key, tree, params):
        """`tree` plus a new trainable guidance embedding, where this family's transformer reads one
        (train: config.student.guidance_input)."""
        if self.lora_file_names is None:
            raise GlanceError(f"a {self.name} transformer reads no trained guidance embedding")
        at, width = self.lora_file_names.guidance_embedder_at(params)
        return lora_tree.with_guidance_embedder(tree, at, lora_tree.new_guidance_embedder(key, width))
