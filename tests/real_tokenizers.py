"""The real tokenizers of FLUX.1-dev and Qwen-Image, written at test time from files that registry packages ship.

Nothing of them is committed; the folders are built from the installed packages (tests/consumers.txt), under
the file names the model repositories use:
- CLIP-L (FLUX.1 `tokenizer/`: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json): from
  open-clip-torch 3.3.0's `open_clip/bpe_simple_vocab_16e6.txt.gz` (MIT). CLIP's vocabulary follows from that
  merge list by CLIP's rule: the 256 byte symbols, the same with `</w>`, one token per merge (the first
  48,894), then <|startoftext|> and <|endoftext|>: 49,408 tokens.
- T5 (FLUX.1 `tokenizer_2/`: tokenizer.json, tokenizer_config.json, special_tokens_map.json): InvokeAI 6.14.2's
  `invokeai/backend/t5/tokenizer/` (Apache-2.0), as they are: 32,100 tokens, </s> = 1, <pad> = 0. The
  repository's spiece.model (the SentencePiece original of tokenizer.json) ships in no package: left out.
- Qwen2.5-VL (Qwen-Image `tokenizer/`: vocab.json, merges.txt, added_tokens.json, tokenizer_config.json,
  special_tokens_map.json): the byte-level BPE of InvokeAI 6.14.2's `invokeai/backend/qwen3/tokenizer/
  tokenizer.json.gz` (Apache-2.0), whose 151,643 tokens and 151,387 merges are Qwen2.5's; its added tokens cut
  to Qwen2.5's 22 (ids 151643-151664; Qwen3 adds four more), so the chat template gives the official ids.
"""

import gzip
import importlib.util
import json
import os
import shutil

from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49,408 = 2 x 256 byte symbols + merges + 2 specials
QWEN25_TOKENS = 151665  # Qwen2.5's vocabulary with its added tokens: ids up to <|file_sep|> = 151664


def _package_file(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise RuntimeError(f"{package} is not installed: pip install --no-deps -r tests/consumers.txt")
    return os.path.join(spec.submodule_search_locations[0], *parts)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2)


def _added(tokens):
    """tokenizer_config's added_tokens_decoder for [(id, content, special)]."""
    return {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": special} for i, c, special in tokens}


def clip_tokenizer(folder, model_max_length=77):
    """FLUX.1-dev's CLIP-L tokenizer folder (its model_max_length is 77)."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(_package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:1 + CLIP_MERGES]  # line 0 is a version comment
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    _write_json(os.path.join(folder, "vocab.json"), {t: i for i, t in enumerate(vocab)})
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    _write_json(os.path.join(folder, "special_tokens_map.json"), specials)
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "add_prefix_space": False, "added_tokens_decoder": _added([(len(vocab) - 2, vocab[-2], True),
                                                                   (len(vocab) - 1, vocab[-1], True)]),
        "clean_up_tokenization_spaces": True, "do_lower_case": True, "errors": "replace",
        "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer", **specials})
    return folder


def t5_tokenizer(folder):
    """FLUX.1-dev's T5 tokenizer folder (tokenizer.json; no spiece.model)."""
    os.makedirs(folder, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(_package_file("invokeai", "backend", "t5", "tokenizer", name), os.path.join(folder, name))
    return folder


def qwen_tokenizer(folder):
    """Qwen-Image's Qwen2.5-VL tokenizer folder."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(_package_file("invokeai", "backend", "qwen3", "tokenizer", "tokenizer.json.gz"), "rt",
                   encoding="utf-8") as f:
        qwen3 = json.load(f)
    model = qwen3["model"]
    _write_json(os.path.join(folder, "vocab.json"), model["vocab"])
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in model["merges"]))
        f.write("\n")
    added = [(t["id"], t["content"], t["special"]) for t in qwen3["added_tokens"] if t["id"] < QWEN25_TOKENS]
    _write_json(os.path.join(folder, "added_tokens.json"), {c: i for i, c, _ in added})
    specials = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    extra = [c for i, c, special in added if special and c not in ("<|endoftext|>",)]
    _write_json(os.path.join(folder, "special_tokens_map.json"), {**specials, "additional_special_tokens": extra})
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": _added(added),
        "additional_special_tokens": extra, "bos_token": None, "clean_up_tokenization_spaces": False,
        "errors": "replace", "model_max_length": 131072, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, **specials})
    return folder
