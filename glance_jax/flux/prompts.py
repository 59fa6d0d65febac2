"""FLUX.1's prompt encoding, as FluxPipeline.encode_prompt: CLIP-L's pooled output (77 tokens, padded to the
maximum, no attention mask) and T5's last hidden state (`max_sequence_length` tokens, padded to the maximum, no
attention mask)."""

import os

import jax
import jax.numpy as jnp

from glance_jax.checkpoints import hub
from glance_jax.flux.text_encoders import CLIPTextModel, T5EncoderModel
from glance_jax.prompts import load_tokenizer, subfolder, tokenize


class FluxPromptEncoder:
    """{"prompt_embeds": (B, T, 4096), "pooled_prompt_embeds": (B, 768)} for FLUX.1 prompts."""

    def __init__(self, clip, t5, clip_tokenizer, t5_tokenizer, max_sequence_length=512):
        self.clip, self.t5 = clip, t5  # (model, params) each
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.max_sequence_length = max_sequence_length
        clip_model, t5_model = clip[0], t5[0]
        self._encode = jax.jit(lambda cp, tp, clip_ids, t5_ids: (
            t5_model.apply({"params": tp}, t5_ids), clip_model.apply({"params": cp}, clip_ids)[1]))

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, max_sequence_length=512):
        """From a FLUX pipeline folder (or hub id): text_encoder, text_encoder_2, tokenizer, tokenizer_2."""
        path = hub.resolve(path, "the text encoder path",
                           ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        return cls(CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), dtype),
                   T5EncoderModel.from_pretrained(os.path.join(path, "text_encoder_2"), dtype),
                   load_tokenizer(subfolder(path, "tokenizer")), load_tokenizer(subfolder(path, "tokenizer_2")),
                   max_sequence_length)

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_ids, _ = tokenize(self.clip_tokenizer, prompts, self.clip_tokenizer.model_max_length, "max_length",
                               "CLIP")
        t5_ids, _ = tokenize(self.t5_tokenizer, prompts, self.max_sequence_length, "max_length", "T5")
        embeds, pooled = self._encode(self.clip[1], self.t5[1], clip_ids, t5_ids)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
