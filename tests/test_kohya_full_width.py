"""The kohya FLUX export read by diffusers itself, at the full width its kohya reader assumes (3072).

One random LoRA on a full-width FLUX.1-dev (1 double + 1 single block) is written twice by
`save_lora`: in diffusers layout and in kohya layout (BFL names, q|k|v and q|k|v|mlp fused into one
LoRA). diffusers loads each with `FluxPipeline.load_lora_weights` (the kohya file through its own
kohya-to-diffusers converter) into the same random transformer; the two outputs must agree within
1e-4 of the output's max, while the LoRA itself moves the output far more than that.
"""

import gc

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers import FluxTransformer2DModel as TorchFlux

from glance_jax import checkpoints, families, lora
from glance_jax.checkpoints import safetensors_io
from torch_peers import flux_inputs, randomize_, relative_error, torch_forward

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
CONFIG = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
              joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
# the block layers the kohya (BFL) layout names: attention (q|k|v fused), the single block's linear1 (q|k|v|mlp
# fused) and linear2, the MLPs and the modulations. Not the final layer: diffusers 0.42's kohya reader puts
# final_layer LoRAs under keys without the "transformer." prefix and ignores their alpha (with the final
# layer included, the two outputs differed by 1.1 relative).
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
           "single_transformer_blocks.0.proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm.linear")


def random_lora(model_config, seed=0):
    """A rank-4 LoRA (alpha 8, scale 2) on TARGETS with random A and small random B, from abstract shapes only."""
    abstract = checkpoints.abstract_params(checkpoints.model_from_config(model_config, np.float32, families.CLASSES))
    tree = lora.init_lora(jax.random.PRNGKey(seed), abstract, list(TARGETS), 4, 8.0)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.002 * jax.random.normal(next(keys), x.shape) if path[-1].key == "B" else x, tree)


def test_kohya_export_loads_in_diffusers_like_the_diffusers_layout(tmp_path):
    torch_model = randomize_(TorchFlux(**CONFIG), seed=0).eval()
    tree = random_lora({"_class_name": "FluxTransformer2DModel", **CONFIG})
    lora.save_lora(tree, tmp_path / "diffusers.safetensors")
    lora.save_lora(tree, tmp_path / "kohya.safetensors", format="kohya", family=families.FLUX)
    del tree
    kohya = safetensors_io.SafetensorsFile(tmp_path / "kohya.safetensors")
    assert kohya.tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 3072)  # fused
    assert kohya.tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)
    inputs = flux_inputs(CONFIG, batch=1, grid=(4, 4), text_len=8)
    base = torch_forward(torch_model, inputs)

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=torch_model)
    outputs = {}
    for name in ("diffusers", "kohya"):
        pipe.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors", adapter_name=name)
        pipe.set_adapters([name])
        outputs[name] = torch_forward(torch_model, inputs)
        pipe.delete_adapters(name)
        gc.collect()
    effect = relative_error(outputs["diffusers"], base)
    err = relative_error(outputs["kohya"], outputs["diffusers"])
    print(f"kohya vs diffusers layout in diffusers, full width: {err:.2e} (the LoRA's own effect: {effect:.2e})")
    assert effect > 100 * TOLERANCE
    assert err < TOLERANCE
    with torch.no_grad():  # the adapters are gone again: the base output is back
        np.testing.assert_allclose(torch_forward(torch_model, inputs), base, rtol=0, atol=1e-5)
