"""Prompt encoding with diffusers' exact semantics, on the Flax text encoders.

What the families' prompt encoders share (glance_jax/flux/prompts.py,
glance_jax/qwen_image/prompts.py): tokenizers come from the model folder
through transformers, never with remote code. A batch of prompts is encoded in
one jit call; prompts that do not fit are cut with a warning that says how
many tokens were cut. Both encoders return the same structure: a dict of
arrays under the names diffusers' pipelines give them (and the encodings files
of `glance-jax sample` and the trainer use).
"""

import logging
import os

import numpy as np

from glance_jax import safe_io
from glance_jax.errors import GlanceError

log = logging.getLogger(__name__)


def load_tokenizer(folder):
    """A transformers tokenizer from `folder`, refusing one that asks for remote code."""
    from transformers import AutoTokenizer

    if not os.path.isdir(folder):
        raise GlanceError(f"{folder}: no tokenizer folder")
    safe_io.no_remote_code(folder)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def tokenize(tokenizer, prompts, max_length, padding, what):
    """input_ids (and mask) of `prompts`, cut to `max_length` with a warning naming how many tokens were cut."""
    batch = tokenizer(prompts, padding=padding, max_length=max_length, truncation=True, return_tensors="np")
    full = tokenizer(prompts, padding="longest", return_tensors="np")
    cut = int(full["attention_mask"].sum(1).max()) - int(batch["attention_mask"].sum(1).max())
    if cut > 0:
        log.warning("%s: prompts longer than %d tokens were truncated; %d token(s) cut from the longest", what,
                    max_length, cut)
    return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)


def subfolder(root, sub):
    """`root/sub` if it exists, else `root` (a tokenizer given as its own folder)."""
    return os.path.join(root, sub) if os.path.isdir(os.path.join(root, sub)) else root
