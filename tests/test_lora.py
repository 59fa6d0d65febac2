"""LoRA against the real peers: diffusers + peft make, save and load LoRAs; outputs agree in fp32."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from diffusers import FluxTransformer2DModel as TorchFlux
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from glance_jax import analysis
from glance_jax.checkpoints import safetensors_io
from glance_jax.errors import GlanceError
from glance_jax.families import FLUX
from glance_jax.lora import (describe, init_lora, load_lora, merge_lora, read_schedule, save_lora,
                             unmerge_lora)
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
from glance_jax.schedules import GlanceSchedule
from glance_jax.models import FluxTransformer2DModel
from torch_peers import flux_inputs, randomize_, relative_error, torch_forward

TOLERANCE = 1e-4
CONFIG = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
RANK, ALPHA = 4, 16.0  # scale 4, as the official recipe (alpha = 4 x rank)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    randomize_(TorchFlux(**CONFIG), seed=0).eval().save_pretrained(path)
    model, params = FluxTransformer2DModel.from_pretrained(path)
    return path, model, params


@pytest.fixture(scope="module")
def inputs():
    return flux_inputs(CONFIG, batch=2, grid=(3, 4), text_len=5, seed=7)


def torch_model_with_peft_lora(base_path, targets=FLUX.lora_targets, rank=RANK, alpha=ALPHA, seed=1):
    """A diffusers model with a peft LoRA whose A and B are random and non-zero."""
    model = TorchFlux.from_pretrained(base_path).eval()
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                 init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    return model


def apply(model, params, inputs, lora=None):
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    return np.asarray(model.apply(variables, **inputs))


@pytest.fixture(scope="module")
def peft_lora(base, inputs, tmp_path_factory):
    """A LoRA made by peft, saved by diffusers with its alpha metadata, and the torch output it gives."""
    path = tmp_path_factory.mktemp("peft")
    torch_model = torch_model_with_peft_lora(base[0])
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(torch_model),
                                   transformer_lora_adapter_metadata=torch_model.peft_config["default"].to_dict())
    return path / "pytorch_lora_weights.safetensors", torch_forward(torch_model, inputs), torch_model


def test_peft_lora_unmerged_and_merged_match_diffusers(base, inputs, peft_lora, caplog):
    _, model, params = base
    path, want, _ = peft_lora
    with caplog.at_level(logging.INFO, logger="glance_jax"):
        tree = load_lora(path, params)
    assert "scale alpha/r = 4" in caplog.text and "LoRA config" in caplog.text
    assert set(tree) == {"transformer_blocks", "single_transformer_blocks"}
    unmerged = relative_error(apply(model, params, inputs, tree), want)
    merged_params = merge_lora(jax.tree_util.tree_map(jnp.copy, params), tree)
    merged = relative_error(apply(model, merged_params, inputs), want)
    print(f"peft LoRA: unmerged {unmerged:.2e}, merged {merged:.2e}")
    assert unmerged <= TOLERANCE and merged <= TOLERANCE
    base_out = apply(model, params, inputs)
    assert relative_error(base_out, want) > 100 * TOLERANCE  # the LoRA really changes the output


def test_lora_without_alpha_is_applied_at_scale_one_like_diffusers(base, inputs, peft_lora, tmp_path, caplog):
    """The official Glance files carry no alpha: diffusers then uses alpha = rank, and so must we."""
    _, model, params = base
    f = safetensors_io.SafetensorsFile(peft_lora[0])
    no_alpha = tmp_path / "no_alpha.safetensors"
    safetensors_io.save_file({k: f.read(k) for k in f.keys()}, no_alpha)  # same tensors, no metadata
    reference = TorchFlux.from_pretrained(base[0]).eval()
    reference.load_lora_adapter(str(tmp_path), weight_name=no_alpha.name, prefix="transformer")
    want = torch_forward(reference, inputs)
    with caplog.at_level(logging.INFO, logger="glance_jax"):
        tree = load_lora(no_alpha, params)
    assert "scale alpha/r = 1 " in caplog.text and "as diffusers applies it" in caplog.text
    assert relative_error(apply(model, params, inputs, tree), want) <= TOLERANCE


def test_lora_made_here_loads_into_diffusers(base, inputs, tmp_path):
    _, model, params = base
    tree = init_lora(jax.random.PRNGKey(0), params, "flux", rank=RANK, alpha=ALPHA)
    tree = jax.tree_util.tree_map_with_path(  # B starts at zero: give it values so the check means something
        lambda p, x: jax.random.normal(jax.random.PRNGKey(1), x.shape) * 0.3 if p[-1].key == "B" else x, tree)
    schedule = GlanceSchedule.from_steps(FLUX_SCHEDULER, (1, 3), (11, 31), image_seq_len=4096)
    save_lora(tree, tmp_path / "lora.safetensors", schedule=schedule)  # diffusers ignores the schedule metadata
    reference = TorchFlux.from_pretrained(base[0]).eval()
    reference.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", prefix="transformer")
    config = reference.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (RANK, RANK)  # alpha / r is in lora_B, for ComfyUI and InvokeAI
    want = torch_forward(reference, inputs)
    err = relative_error(apply(model, params, inputs, tree), want)
    print(f"LoRA saved here, loaded by diffusers: {err:.2e}")
    assert err <= TOLERANCE
    again = load_lora(tmp_path / "lora.safetensors", params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), again, tree)


def kohya_from_peft_state_dict(sd, hidden):
    """What sd-scripts writes for FLUX: one LoRA per BFL module, q|k|v (and mlp) fused.

    Built from peft LoRAs that share nothing, so the fused down matrix stacks the parts and the up
    matrix is block diagonal; alpha is written per module.
    """
    get = lambda m: (sd[f"{m}.lora_A.weight"].numpy(), sd[f"{m}.lora_B.weight"].numpy())
    out = {}

    def put(bfl, down, up, alpha):
        out[f"lora_unet_{bfl}.lora_down.weight"], out[f"lora_unet_{bfl}.lora_up.weight"] = down, up
        out[f"lora_unet_{bfl}.alpha"] = np.float32(alpha)

    def fused(modules, rows):
        downs, ups = zip(*[get(m) for m in modules])
        up = np.zeros((sum(rows), RANK * len(modules)), np.float32)
        for k, u in enumerate(ups):
            up[k * hidden:(k + 1) * hidden, k * RANK:(k + 1) * RANK] = u
        return np.concatenate(downs), up

    for i in range(CONFIG["num_layers"]):
        b = f"transformer_blocks.{i}.attn"
        put(f"double_blocks_{i}_img_attn_qkv", *fused([f"{b}.to_q", f"{b}.to_k", f"{b}.to_v"], [hidden] * 3),
            ALPHA * 3)  # rank 3r with alpha 3 alpha keeps the scale alpha / r
        put(f"double_blocks_{i}_img_attn_proj", *get(f"{b}.to_out.0"), ALPHA)
    for i in range(CONFIG["num_single_layers"]):
        b = f"single_transformer_blocks.{i}.attn"
        put(f"single_blocks_{i}_linear1",
            *fused([f"{b}.to_q", f"{b}.to_k", f"{b}.to_v"], [hidden] * 3 + [4 * hidden]), ALPHA * 3)
    return out


def test_kohya_file_loads_like_its_diffusers_equivalent(base, inputs, peft_lora, tmp_path):
    _, model, params = base
    path, want, torch_model = peft_lora
    hidden = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    kohya = kohya_from_peft_state_dict(get_peft_model_state_dict(torch_model), hidden)
    safetensors_io.save_file(kohya, tmp_path / "kohya.safetensors")
    err = relative_error(apply(model, params, inputs, load_lora(tmp_path / "kohya.safetensors", params)), want)
    print(f"kohya (BFL names, fused qkv/linear1): {err:.2e}")
    assert err <= TOLERANCE
    comfy = {k.replace("lora_unet_", "diffusion_model.").replace("_img_attn_", ".img_attn.")
             .replace("double_blocks_", "double_blocks.").replace("single_blocks_", "single_blocks.")
             .replace("_linear1", ".linear1"): v for k, v in kohya.items()}
    assert any(k.startswith("diffusion_model.double_blocks.0.img_attn.qkv") for k in comfy)
    safetensors_io.save_file(comfy, tmp_path / "comfy.safetensors")
    err = relative_error(apply(model, params, inputs, load_lora(tmp_path / "comfy.safetensors", params)), want)
    assert err <= TOLERANCE


def test_kohya_export_round_trip(base, inputs, peft_lora, tmp_path):
    _, model, params = base
    tree = load_lora(peft_lora[0], params)
    save_lora(tree, tmp_path / "k.safetensors", format="kohya", family=FLUX)
    keys = set(safetensors_io.SafetensorsFile(tmp_path / "k.safetensors").keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    again = load_lora(tmp_path / "k.safetensors", params)
    assert relative_error(apply(model, params, inputs, again), peft_lora[1]) <= TOLERANCE


def test_merge_then_unmerge_restores_the_base(base, inputs, peft_lora):
    _, model, params = base
    tree = load_lora(peft_lora[0], params)
    second = init_lora(jax.random.PRNGKey(3), params, ["ff.net.2", "proj_out"], rank=2, alpha=2.0)
    second = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) * 0.05 if p[-1].key == "B" else x, second)
    merged = merge_lora(jax.tree_util.tree_map(jnp.copy, params), tree, scale=0.5)
    merged = merge_lora(merged, second, scale=2.0)
    both = apply(model, merged, inputs)
    restored = unmerge_lora(unmerge_lora(merged, second, scale=2.0), tree, scale=0.5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), restored, params)
    assert relative_error(both, apply(model, params, inputs)) > 1e-3


def test_merge_donates_the_base_buffers(base, peft_lora):
    params = jax.tree_util.tree_map(jnp.copy, base[2])
    kernel = params["transformer_blocks"]["attn"]["to_q"]["kernel"]
    merged = merge_lora(params, load_lora(peft_lora[0], params))
    assert kernel.is_deleted()  # updated in place: no second copy of the base
    assert not merged["transformer_blocks"]["attn"]["to_q"]["kernel"].is_deleted()
    kept = jax.tree_util.tree_map(jnp.copy, base[2])
    merge_lora(kept, load_lora(peft_lora[0], kept), donate=False)
    assert not kept["transformer_blocks"]["attn"]["to_q"]["kernel"].is_deleted()


def test_gradients_reach_only_the_lora(base, inputs):
    _, model, params = base
    tree = init_lora(jax.random.PRNGKey(0), params, "flux", rank=RANK, alpha=ALPHA)
    loss = lambda lora: jnp.mean(model.apply({"params": params, "lora": lora}, **inputs) ** 2)
    grads = jax.grad(loss)(tree)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(tree)
    assert float(jnp.abs(grads["transformer_blocks"]["attn"]["to_q"]["B"]).max()) > 0


def test_init_is_peft_gaussian(base):
    params = base[2]
    tree = init_lora(jax.random.PRNGKey(0), params, "flux", rank=8, alpha=32.0)
    to_q = tree["single_transformer_blocks"]["attn"]["to_q"]
    assert to_q["A"].shape == (2, 32, 8) and to_q["B"].shape == (2, 8, 32)
    assert float(jnp.abs(to_q["B"]).max()) == 0 and abs(float(to_q["A"].std()) - 1 / 8) < 0.03
    assert "to_out.0" in tree["transformer_blocks"]["attn"] and "to_out.0" not in tree["single_transformer_blocks"]
    assert describe(tree) == "14 layers, rank 8, scale alpha/r = 4"  # 2 x (q, k, v, out) + 2 x (q, k, v)


def test_unknown_keys_are_never_skipped_silently(base, peft_lora, tmp_path, caplog):
    params = base[2]
    f = safetensors_io.SafetensorsFile(peft_lora[0])
    tensors = {k: f.read(k) for k in f.keys()}
    tensors["transformer.transformer_blocks.0.attn.to_qq.lora_A.weight"] = np.zeros((RANK, 32), np.float32)
    tensors["transformer.transformer_blocks.0.attn.to_qq.lora_B.weight"] = np.zeros((32, RANK), np.float32)
    safetensors_io.save_file(tensors, tmp_path / "extra.safetensors", f.metadata)
    with pytest.raises(GlanceError, match="2 keys match nothing.*to_qq.lora_A.weight"):
        load_lora(tmp_path / "extra.safetensors", params)
    with caplog.at_level(logging.WARNING, logger="glance_jax"):
        tree = load_lora(tmp_path / "extra.safetensors", params, strict=False)
    assert "to_qq.lora_A.weight" in caplog.text and "to_qq.lora_B.weight" in caplog.text
    assert "to_q" in tree["transformer_blocks"]["attn"]


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"transformer.transformer_blocks.0.attn.to_k.lora_B.weight": np.zeros((32, RANK + 1))}),
     "different ranks"),
    (lambda t: t.update({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": np.zeros((RANK, 31)),
                         "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": np.zeros((32, RANK))}),
     "LoRA maps 31 -> 32, the layer 32 -> 32"),
    (lambda t: t.pop("transformer.transformer_blocks.1.attn.to_v.lora_B.weight"), "to_v has A only"),
    (lambda t: t.update({"transformer.transformer_blocks.0.attn.to_k.lora_magnitude_vector": np.zeros(32)}),
     "unsupported LoRA variant"),
])
def test_bad_lora_files(base, peft_lora, tmp_path, edit, message):
    f = safetensors_io.SafetensorsFile(peft_lora[0])
    tensors = {k: f.read(k).astype(np.float32) for k in f.keys()}
    edit(tensors)
    safetensors_io.save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(GlanceError, match=message):
        load_lora(tmp_path / "bad.safetensors", base[2])


def test_a_model_file_is_not_a_lora(base):
    with pytest.raises(GlanceError, match="not a LoRA file"):
        load_lora(base[0] / "diffusion_pytorch_model.safetensors", base[2])


def test_lora_train_step_costs_about_two_forwards():
    """Forward + backward with respect to the LoRA must not compute base weight gradients.

    Full-width FLUX.1-dev blocks (3072 wide), 2 double + 2 single, 512 x 512, from abstract shapes:
    XLA's cost analysis counts the FLOPs; the ratio must stay at or below 2.2.
    """
    model = analysis.for_cost_analysis(FluxTransformer2DModel(num_layers=2, num_single_layers=2,
                                                              guidance_embeds=True))
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    lora = jax.eval_shape(lambda p: init_lora(jax.random.PRNGKey(0), p, "flux", 16, 64.0), params)
    inputs = jax.eval_shape(lambda: model.example_inputs(1, 1024, 512))

    def forward(params, lora, inputs):
        return model.apply({"params": params, "lora": lora}, **inputs)

    def train(params, lora, inputs):
        return jax.grad(lambda ad: jnp.mean(forward(params, ad, inputs).astype(jnp.float32) ** 2))(lora)

    ratio = analysis.flops(train, params, lora, inputs) / analysis.flops(forward, params, lora, inputs)
    print(f"LoRA train step / forward FLOPs: {ratio:.3f}")
    assert 1.5 < ratio <= 2.2


def test_export_lora_command(base, inputs, peft_lora, tmp_path, capsys):
    from glance_jax.cli import main
    _, model, params = base
    dst = tmp_path / "kohya.safetensors"
    assert main(["export-lora", str(peft_lora[0]), str(dst), "--model", str(base[0]), "--format", "kohya"]) == 0
    assert "14 layers, rank 4, scale alpha/r = 4" in capsys.readouterr().out
    assert relative_error(apply(model, params, inputs, load_lora(dst, params)), peft_lora[1]) <= TOLERANCE
    assert main(["export-lora", str(peft_lora[0]), str(dst), "--model", str(base[0])]) == 1
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    safetensors_io.save_file({"transformer.nope.lora_A.weight": np.zeros((2, 2), np.float32),
                              "transformer.nope.lora_B.weight": np.zeros((2, 2), np.float32)}, bad)
    assert main(["export-lora", str(bad), str(tmp_path / "x.safetensors"), "--model", str(base[0])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("glance-jax export-lora: error:") and "transformer.nope.lora_A.weight" in err[-1]
    assert not (tmp_path / "x.safetensors").exists()


def test_schedule_travels_with_the_lora(base, peft_lora, tmp_path):
    """The Glance schedule written into a LoRA file comes back equal, through export-lora in both layouts."""
    from glance_jax.cli import main
    _, _, params = base
    tree = init_lora(jax.random.PRNGKey(0), params, "flux", rank=RANK, alpha=ALPHA)
    for schedule in (GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=1024),
                     GlanceSchedule.from_timesteps((1000.0, 951.25), (700.5, 123.0))):
        save_lora(tree, tmp_path / "slow.safetensors", schedule=schedule)
        assert read_schedule(tmp_path / "slow.safetensors") == schedule
        for layout in ("kohya", "diffusers"):
            dst = tmp_path / f"{layout}.safetensors"
            assert main(["export-lora", str(tmp_path / "slow.safetensors"), str(dst), "--model", str(base[0]),
                         "--format", layout, "--overwrite"]) == 0
            assert read_schedule(dst) == schedule
    assert read_schedule(peft_lora[0]) is None  # a file from elsewhere carries none
    assert GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=1024).for_image_seq_len(4096) == \
        GlanceSchedule.from_dict(GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=1024).to_dict()).for_image_seq_len(4096)
    with pytest.raises(GlanceError, match="decrease"):
        GlanceSchedule.from_dict({"slow": [900.0, 950.0], "fast": [100.0]})
