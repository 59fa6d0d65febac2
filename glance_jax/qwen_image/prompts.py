"""Qwen-Image's prompt encoding, as QwenImagePipeline.encode_prompt: the prompt inside Qwen-Image's chat template,
Qwen2.5-VL's final hidden states of the real tokens with the first 34 (template) tokens dropped, right-padded with
zeros to the longest prompt, and the mask of real tokens."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from glance_jax.checkpoints import hub
from glance_jax.prompts import load_tokenizer, subfolder, tokenize
from glance_jax.qwen_image.text_encoder import Qwen25VLTextModel

QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
QWEN_TEMPLATE_TOKENS = 34  # diffusers' prompt_template_encode_start_idx
QWEN_MAX_TOKENS = 1024


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
        return cls(Qwen25VLTextModel.from_pretrained(os.path.join(path, "text_encoder"), dtype),
                   load_tokenizer(subfolder(path, "tokenizer")), max_sequence_length)

    def __call__(self, prompts):
        """Tokenized to `max_sequence_length` tokens after the template: the language model is causal, so the
        states kept are those diffusers keeps from its 1024-token tokenization, and the cut is the one warned of."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        length = min(self.max_sequence_length, QWEN_MAX_TOKENS) + QWEN_TEMPLATE_TOKENS
        ids, mask = tokenize(self.tokenizer, [QWEN_TEMPLATE.format(p) for p in prompts], length, True, "Qwen2.5-VL")
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
