"""Text encoding: the jit-compiled Flax encoders against transformers eager, same CPU, same weights, one process.

CLIP-L at its real size (12 layers, 768 wide, 77 tokens); T5 (gated-GELU) and the Qwen2.5-VL language model at
reduced sizes (T5: 8 layers x 512, 512 tokens; Qwen: 4 layers x 1024 with 8 heads / 2 KV heads, 128 tokens),
batch 4, fp32, random weights. Prints medians, ratios and parity.

    python benchmarks/text_encoders.py   # about 2 minutes on 2 CPU cores
"""

import os
import sys
import tempfile

import jax
import numpy as np
import torch
from transformers import CLIPTextConfig, Qwen2_5_VLConfig, T5Config
from transformers import CLIPTextModel as TorchCLIP
from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwenVL
from transformers import T5EncoderModel as TorchT5

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import interleaved_medians, report  # noqa: E402
from torch_peers import relative_error  # noqa: E402

from glance_jax import families  # noqa: E402

CASES = {
    "clip_l": (lambda: TorchCLIP(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12)), 77),
    "t5_8x512": (lambda: TorchT5(T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=8,
                                         feed_forward_proj="gated-gelu")), 512),
    "qwen25vl_4x1024": (lambda: TorchQwenVL(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=1024))), 128),
}


def main():
    for name, (build, length) in CASES.items():
        torch_model = build().eval()
        with tempfile.TemporaryDirectory() as tmp:
            torch_model.save_pretrained(tmp)
            model, params = families.load_model(tmp)
        rng = np.random.default_rng(0)
        ids = rng.integers(5, 1000, (4, length)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1:, length // 2:] = 0
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        # Qwen: its language model alone (the full model would also compute 152k-word LM-head logits)
        peer = torch_model.model.language_model if name.startswith("qwen") else torch_model

        def run_torch():
            with torch.no_grad():
                return peer(input_ids=t_ids, attention_mask=t_mask).last_hidden_state

        encode = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
        first = lambda out: out[0] if isinstance(out, tuple) else out
        run_jax = lambda: jax.block_until_ready(encode(params, ids, mask))
        err = relative_error(np.asarray(first(run_jax())), run_torch().numpy())
        t = interleaved_medians({"jax": run_jax, "torch": run_torch}, repeats=7)
        report(f"{name}_encode_cpu", batch=4, tokens=length, torch_eager_ms=1e3 * t["torch"],
               jax_jit_ms=1e3 * t["jax"], speedup_jax_over_torch=t["torch"] / t["jax"], parity_relative_error=err)


if __name__ == "__main__":
    main()
