"""Prompt encoding with diffusers' exact semantics, on the Flax text encoders.

`FluxPromptEncoder`: CLIP-L's pooled output (77 tokens, padded to the
maximum, no attention mask) and T5's last hidden state (`max_sequence_length`
tokens, padded to the maximum, no attention mask), as FluxPipeline.encode_prompt.
`QwenImagePromptEncoder`: the prompt inside Qwen-Image's chat template,
Qwen2.5-VL's final hidden states of the real tokens with the first 34
(template) tokens dropped, right-padded with zeros to the longest prompt, and
the mask of real tokens, as QwenImagePipeline.encode_prompt. Tokenizers come
from the model folder through transformers. A batch of prompts is encoded in
one jit call; prompts that do not fit are cut with a warning that says how
many tokens were cut. Both encoders return the same structure: a dict of
arrays under the names diffusers' pipelines give them (and the encodings files
of `glance-jax sample` and the trainer use).
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from glance_jax.checkpoints import hub, load_model
from glance_jax.errors import GlanceError

log = logging.getLogger(__name__)
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
QWEN_TEMPLATE_TOKENS = 34  # diffusers' prompt_template_encode_start_idx
QWEN_MAX_TOKENS = 1024


def _tokenizer(folder):
    from transformers import AutoTokenizer

    from glance_jax import validation  # (validation imports families, which imports this module)
    if not os.path.isdir(folder):
        raise GlanceError(f"{folder}: no tokenizer folder")
    validation.no_remote_code(folder)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _tokenize(tokenizer, prompts, max_length, padding, what):
    """input_ids (and mask) of `prompts`, cut to `max_length` with a warning naming how many tokens were cut."""
    batch = tokenizer(prompts, padding=padding, max_length=max_length, truncation=True, return_tensors="np")
    full = tokenizer(prompts, padding="longest", return_tensors="np")
    cut = int(full["attention_mask"].sum(1).max()) - int(batch["attention_mask"].sum(1).max())
    if cut > 0:
        log.warning("%s: prompts longer than %d tokens were truncated; %d token(s) cut from the longest", what,
                    max_length, cut)
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


def _folder(root, sub):
    return os.path.join(root, sub) if os.path.isdir(os.path.join(root, sub)) else root


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
        return cls(load_model(os.path.join(path, "text_encoder"), dtype), load_model(os.path.join(path,
                   "text_encoder_2"), dtype), _tokenizer(_folder(path, "tokenizer")),
                   _tokenizer(_folder(path, "tokenizer_2")), max_sequence_length)

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip_ids, _ = _tokenize(self.clip_tokenizer, prompts, self.clip_tokenizer.model_max_length, "max_length",
                                "CLIP")
        t5_ids, _ = _tokenize(self.t5_tokenizer, prompts, self.max_sequence_length, "max_length", "T5")
        embeds, pooled = self._encode(self.clip[1], self.t5[1], clip_ids, t5_ids)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


class QwenImagePromptEncoder:
    """{"prompt_embeds": (B, T, 3584), "prompt_embeds_mask": (B, T), only if some prompt is padded} for Qwen-Image."""

    def __init__(self, encoder, tokenizer, max_sequence_length=QWEN_MAX_TOKENS):
        self.encoder, self.tokenizer, self.max_sequence_length = encoder, tokenizer, max_sequence_length
        model = encoder[0]
        self._encode = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, max_sequence_length=QWEN_MAX_TOKENS):
        """From a Qwen-Image pipeline folder (or hub id): text_encoder and tokenizer."""
        path = hub.resolve(path, "the text encoder path", ("text_encoder", "tokenizer"))
        return cls(load_model(os.path.join(path, "text_encoder"), dtype), _tokenizer(_folder(path, "tokenizer")),
                   max_sequence_length)

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = _tokenize(self.tokenizer, [QWEN_TEMPLATE.format(p) for p in prompts],
                              QWEN_MAX_TOKENS + QWEN_TEMPLATE_TOKENS, True, "Qwen2.5-VL")
        hidden = np.asarray(self._encode(self.encoder[1], ids, mask))
        kept = [h[m.astype(bool)][QWEN_TEMPLATE_TOKENS:] for h, m in zip(hidden, mask)]
        length = max(len(k) for k in kept)
        embeds = np.stack([np.concatenate([k, np.zeros((length - len(k), k.shape[1]), k.dtype)]) for k in kept])
        out_mask = np.stack([np.arange(length) < len(k) for k in kept]).astype(np.int32)
        embeds, out_mask = embeds[:, :self.max_sequence_length], out_mask[:, :self.max_sequence_length]
        encodings = {"prompt_embeds": jnp.asarray(embeds)}
        if not out_mask.all():
            encodings["prompt_embeds_mask"] = jnp.asarray(out_mask)
        return encodings
