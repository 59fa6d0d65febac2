"""Hugging Face hub ids where a model folder is accepted: `black-forest-labs/FLUX.1-dev`, or `...@revision`.

A path that exists on disk is always used as it is. Anything else shaped like a hub id is fetched through
huggingface_hub into its cache (HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE are read when the id is resolved),
with only the pipeline parts a command needs and the top-level configs: never a repository's other
top-level files (FLUX.1-dev's single-file flux1-dev.safetensors and ae.safetensors). An id that is neither
in the cache nor reachable is refused in one line.
"""

import os
import re

from glance_jax.errors import GlanceError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
TOP_LEVEL = ("model_index.json", "config.json", "diffusion_pytorch_model*.safetensors*")  # a pipeline or a model


def _env_flag(name):
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir():
    """huggingface_hub's cache folder as the environment names it now (None: its own default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def resolve(path, what="the model path", parts=PIPELINE_PARTS):
    """A local path for `path`: itself if it exists or is no hub id, else the hub snapshot of the id's
    `parts` (sub-folders of a pipeline repository) and top-level configs."""
    local = os.path.expanduser(os.fspath(path))
    if os.path.exists(local) or not HUB_ID.fullmatch(local):
        return local
    from huggingface_hub import snapshot_download
    repo, _, revision = local.partition("@")
    offline = _env_flag("HF_HUB_OFFLINE")
    try:
        return snapshot_download(repo, revision=revision or None, cache_dir=_cache_dir(), local_files_only=offline,
                                 allow_patterns=[*TOP_LEVEL, *(f"{p}/*" for p in parts)])
    except Exception as e:  # not cached, not reachable, no such repository or revision: all end the command
        where = _cache_dir() or "huggingface_hub's default cache"
        cause = ("HF_HUB_OFFLINE is set" if offline else
                 "and could not be fetched: " + (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise GlanceError(f"{what} {path}: no such local path, and hub model {repo}"
                          f"{'@' + revision if revision else ''} is not in {where} ({cause})") from None
