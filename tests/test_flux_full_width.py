"""Full-width FLUX.1-dev (hidden 3072, 24 x 128 heads, joint 4096, pooled 768) with 1 double + 1 single block.

The same random weights are read from a Black Forest Labs-format file and
from a diffusers folder. The reference is diffusers itself: its own
BFL-to-diffusers conversion (`single_file_utils`) loads the BFL file into
`FluxTransformer2DModel`, so the BFL table of this project is checked against
diffusers' mapping, not against itself.
"""

import gc

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel as TorchFlux
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from glance_jax.models import FluxTransformer2DModel
from torch_peers import flux_inputs, relative_error, torch_forward

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
D, MLP, HEAD = 3072, 12288, 128


def bfl_state_dict(seed=0):
    """A random FLUX.1-dev checkpoint in BFL's own key layout and shapes, one block of each kind."""
    shapes = {"img_in": (D, 64), "txt_in": (D, 4096), "time_in.in_layer": (D, 256), "time_in.out_layer": (D, D),
              "vector_in.in_layer": (D, 768), "vector_in.out_layer": (D, D), "guidance_in.in_layer": (D, 256),
              "guidance_in.out_layer": (D, D), "final_layer.linear": (64, D),
              "final_layer.adaLN_modulation.1": (2 * D, D), "single_blocks.0.linear1": (3 * D + MLP, D),
              "single_blocks.0.linear2": (D, D + MLP), "single_blocks.0.modulation.lin": (3 * D, D)}
    for s in ("img", "txt"):
        shapes.update({f"double_blocks.0.{s}_mod.lin": (6 * D, D), f"double_blocks.0.{s}_attn.qkv": (3 * D, D),
                       f"double_blocks.0.{s}_attn.proj": (D, D), f"double_blocks.0.{s}_mlp.0": (MLP, D),
                       f"double_blocks.0.{s}_mlp.2": (D, MLP)})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in shapes.items():
        sd[f"{name}.weight"] = torch.randn(out, inp, generator=g) / inp ** 0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(out, generator=g)
    norms = ["double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm", "single_blocks.0.norm"]
    for norm in norms:
        for qk in ("query_norm", "key_norm"):
            sd[f"{norm}.{qk}.scale"] = 1 + 0.1 * torch.randn(HEAD, generator=g)
    return sd


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full_width")
    sd = bfl_state_dict()
    save_file(sd, tmp / "flux1-dev-2blocks.safetensors")
    torch_model = TorchFlux(num_layers=1, num_single_layers=1, guidance_embeds=True)
    torch_model.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(sd), strict=True)
    del sd
    torch_model.eval().save_pretrained(tmp / "diffusers")
    config = dict(torch_model.config)
    inputs = flux_inputs(config, batch=1, grid=(16, 16), text_len=64, seed=1)  # 256 x 256 pixels
    want = torch_forward(torch_model, inputs)
    del torch_model
    gc.collect()
    return tmp, inputs, want


@pytest.mark.parametrize("source", ["diffusers", "flux1-dev-2blocks.safetensors"])
def test_full_width_matches_diffusers(reference, source):
    tmp, inputs, want = reference
    model, params = FluxTransformer2DModel.from_pretrained(tmp / source)
    assert (model.num_attention_heads, model.attention_head_dim, model.joint_attention_dim) == (24, 128, 4096)
    assert model.guidance_embeds and (model.num_layers, model.num_single_layers) == (1, 1)
    got = np.asarray(model.apply({"params": params}, **inputs))
    err = relative_error(got, want)
    print(f"full width from {source}: relative error {err:.2e}")
    assert err <= TOLERANCE
