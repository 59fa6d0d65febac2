"""Parity of the Flax FLUX transformer with diffusers' FluxTransformer2DModel (fp32, tiny random models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FluxTransformer2DModel as TorchFlux

from glance_jax import checkpoints, families
from glance_jax.models import FluxTransformer2DModel
from torch_peers import flux_inputs, randomize_, relative_error, torch_forward

TOLERANCE = 1e-4  # max abs error / max abs output, fp32 (the bound; we measure about 1e-5 or less)

TINY = dict(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=[4, 6, 6])
VARIANTS = {"dev": dict(TINY, guidance_embeds=True), "schnell": dict(TINY, guidance_embeds=False)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each variant as a torch model and as a diffusers folder on disk (single file; dev also sharded)."""
    out = {}
    for i, (variant, config) in enumerate(VARIANTS.items()):
        torch_model = randomize_(TorchFlux(**config), seed=i).eval()
        path = tmp_path_factory.mktemp(variant)
        torch_model.save_pretrained(path)
        out[variant] = (torch_model, path, config)
    sharded = tmp_path_factory.mktemp("dev_sharded")
    out["dev"][0].save_pretrained(sharded, max_shard_size="20KB")
    out["dev_sharded"] = sharded
    return out


@pytest.fixture(scope="module")
def loaded(saved):
    return {v: FluxTransformer2DModel.from_pretrained(saved[v][1]) for v in VARIANTS}


@pytest.mark.parametrize("variant,grid,text_len,batch", [
    ("dev", (3, 5), 1, 2),
    ("dev", (4, 4), 77, 2),
    ("schnell", (5, 3), 77, 2),
    ("schnell", (2, 6), 1, 1),
])
def test_matches_diffusers(saved, loaded, variant, grid, text_len, batch):
    torch_model, _, config = saved[variant]
    model, params = loaded[variant]
    inputs = flux_inputs(config, batch, grid, text_len, seed=batch + text_len)
    want = torch_forward(torch_model, inputs)
    got = np.asarray(model.apply({"params": params}, **inputs))
    assert got.shape == want.shape == (batch, grid[0] * grid[1], config["in_channels"])
    err = relative_error(got, want)
    print(f"{variant} grid={grid} text={text_len} batch={batch}: relative error {err:.2e}")
    assert err <= TOLERANCE


def test_sharded_folder_loads_the_same(saved, loaded):
    model, params = FluxTransformer2DModel.from_pretrained(saved["dev_sharded"])
    assert len(list(saved["dev_sharded"].glob("*.safetensors"))) > 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded["dev"][1])


def test_converted_folder_round_trip(saved, loaded, tmp_path):
    checkpoints.convert_checkpoint(saved["schnell"][1], tmp_path / "conv", families.CLASSES, dtype="fp32")
    model, params = FluxTransformer2DModel.from_pretrained(tmp_path / "conv")
    assert model == loaded["schnell"][0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded["schnell"][1])


def test_bf16_close_to_fp32(saved, loaded, tmp_path):
    """bf16 weights and compute stay within 5e-2 (relative to the output's max) of fp32."""
    _, path, config = saved["dev"]
    model32, params32 = loaded["dev"]
    model16, params16 = FluxTransformer2DModel.from_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params16))
    inputs = flux_inputs(config, 2, (4, 4), 8, seed=3)
    want = np.asarray(model32.apply({"params": params32}, **inputs))
    got = model16.apply({"params": params16}, **inputs)
    assert got.dtype == jnp.bfloat16
    err = relative_error(np.asarray(got, np.float32), want)
    print(f"bf16 vs fp32: relative error {err:.2e}")
    assert err <= 5e-2


def test_dev_requires_guidance(loaded, saved):
    model, params = loaded["dev"]
    inputs = flux_inputs(saved["dev"][2], 1, (2, 2), 3)
    inputs["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        model.apply({"params": params}, **inputs)


def test_remat_and_scan_do_not_change_the_output(saved, loaded):
    """Remat policies change memory, never values."""
    model, params = loaded["schnell"]
    inputs = flux_inputs(saved["schnell"][2], 1, (3, 3), 5)
    want = np.asarray(model.apply({"params": params}, **inputs))
    for policy in ("full", "dots"):
        remat = model.clone(remat_policy=policy)
        loss = lambda p: jnp.sum(remat.apply({"params": p}, **inputs) ** 2)
        np.testing.assert_allclose(remat.apply({"params": params}, **inputs), want, rtol=1e-6, atol=1e-6)
        assert np.isfinite(jax.tree_util.tree_leaves(jax.grad(loss)(params))[0]).all()
