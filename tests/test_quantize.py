"""The fp8 / int8 frozen base against optimum-quanto (qfloat8 / qint8 on diffusers' models), in fp32.

The reference is what the official Glance code trains on: `quantize(transformer, weights=qfloat8);
freeze(transformer)` (every Linear gets 8-bit weights with one absmax scale per output channel;
activations stay in the compute dtype). The Flax model loaded with `quantize=` must give the quanto
model's output within TOLERANCE; each test also reports how far quantization moved the output from the
float model's, and requires that it did move (so the comparison cannot pass on an unquantized model).
"""

import copy
import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel as TorchFlux
from diffusers import QwenImageTransformer2DModel as TorchQwen
from optimum.quanto import freeze, qfloat8, qint8, quantize
from peft import LoraConfig
from PIL import Image

from glance_jax import checkpoints, data, evaluation, sharding
from glance_jax.checkpoints import safetensors_io
from glance_jax import quantize as quant
from glance_jax.errors import GlanceError
from glance_jax.lora import init_lora, load_lora, merge_lora
from glance_jax.models import FluxTransformer2DModel, QwenImageTransformer2DModel
from glance_jax.pipelines import FluxGlancePipeline
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
from glance_jax.schedules import GlanceSchedule
from test_qwen_image import TINY as QWEN_TINY
from test_qwen_image import jax_qwen, qwen_inputs, torch_qwen
from torch_peers import flux_inputs, randomize_, relative_error, torch_forward

TOLERANCE = 1e-4
QTYPES = {"fp8": qfloat8, "int8": qint8}
CONFIG = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])


def quanto(model, kind, exclude=None):
    """The official recipe's quantization of a torch model, in place: quantize, then freeze."""
    quantize(model, weights=QTYPES[kind], exclude=exclude)
    freeze(model)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_flux")
    torch_model = randomize_(TorchFlux(**CONFIG), seed=0).eval()
    torch_model.save_pretrained(path)
    inputs = flux_inputs(CONFIG, batch=2, grid=(3, 4), text_len=5, seed=7)
    return path, torch_model, inputs


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_tiny_flux_matches_quanto(tiny, kind):
    path, torch_model, inputs = tiny
    float_out = torch_forward(torch_model, inputs)
    want = torch_forward(quanto(copy.deepcopy(torch_model), kind), inputs)
    model, params = FluxTransformer2DModel.from_pretrained(path, quantize=kind)
    assert quant.kind_of(params) == kind
    kernel = params["transformer_blocks"]["attn"]["to_q"]["kernel"]
    assert kernel.dtype == quant.storage_dtype(kind) and kernel.shape == (2, 32, 32)
    assert params["transformer_blocks"]["attn"]["to_q"]["kernel_scale"].shape == (2, 32)
    got = np.asarray(model.apply({"params": params}, **inputs))
    err, moved = relative_error(got, want), relative_error(want, float_out)
    print(f"tiny FLUX {kind}: vs quanto {err:.2e}; quanto vs float {moved:.2e}")
    assert err <= TOLERANCE and moved > 10 * TOLERANCE


def test_tiny_qwen_image_matches_quanto(tmp_path):
    torch_model = randomize_(TorchQwen(**QWEN_TINY), seed=0).eval()
    torch_model.save_pretrained(tmp_path)
    inputs = qwen_inputs(QWEN_TINY, 2, (3, 4), 6, np.array([[1] * 6, [1] * 3 + [0] * 3]), seed=3)
    for kind in QTYPES:
        want = torch_qwen(quanto(copy.deepcopy(torch_model), kind), inputs, (3, 4))
        model, params = QwenImageTransformer2DModel.from_pretrained(tmp_path, quantize=kind)
        err = relative_error(jax_qwen(model, params, inputs, (3, 4)), want)
        print(f"tiny Qwen-Image {kind}: vs quanto {err:.2e}")
        assert err <= TOLERANCE


def test_unmerged_lora_on_quantized_base_matches_peft_on_quanto(tiny):
    """A peft LoRA over quanto-quantized base layers (the LoRA itself stays float), against our unmerged LoRA."""
    path, _, inputs = tiny
    torch_model = TorchFlux.from_pretrained(path).eval()
    torch_model.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    lora_state = {k: v.detach().clone() for k, v in torch_model.state_dict().items() if "lora_" in k}
    want = torch_forward(quanto(torch_model, "fp8", exclude=["*lora_A*", "*lora_B*"]), inputs)
    assert all(torch.equal(v, torch_model.state_dict()[k]) for k, v in lora_state.items())  # LoRA not quantized

    model, params = FluxTransformer2DModel.from_pretrained(path, quantize="fp8")
    peft_sd = {k.replace(".default", ""): v for k, v in lora_state.items()}
    tree = load_lora(peft_sd, params)
    tree = jax.tree_util.tree_map_with_path(  # the state dict carries no alpha: peft's is 16 (scale 4)
        lambda p, x: jnp.where(x != 0, 16.0, 0.0) if p[-1].key == "alpha" else x, tree)
    got = np.asarray(model.apply({"params": params, "lora": tree}, **inputs))
    err = relative_error(got, want)
    print(f"peft LoRA on a quanto fp8 base vs unmerged LoRA on ours: {err:.2e}")
    assert err <= TOLERANCE


def test_merging_into_a_quantized_base_is_refused(tiny):
    path, _, inputs = tiny
    model, params = FluxTransformer2DModel.from_pretrained(path, quantize="int8")
    tree = init_lora(jax.random.PRNGKey(0), params, "flux", rank=4, alpha=16.0)
    with pytest.raises(GlanceError, match=r"cannot merge a LoRA into a quantized \(int8\) base: apply it unmerged"):
        merge_lora(params, tree)
    pipe = FluxGlancePipeline(model, params, FLUX_SCHEDULER, latent_channels=4)
    schedule = GlanceSchedule.from_steps(FLUX_SCHEDULER, (1, 5), (9,), image_seq_len=4)
    kw = dict(prompt_embeds=inputs["encoder_hidden_states"][:1], pooled_prompt_embeds=inputs["pooled_projections"][:1],
              height=32, width=32, schedule=schedule, slow_lora=tree, fast_lora=tree)
    with pytest.raises(GlanceError, match="lora_mode='merge' needs a float base; this one is int8"):
        pipe(**kw, lora_mode="merge")
    kernel = np.asarray(pipe.params["transformer_blocks"]["attn"]["to_q"]["kernel"], np.float32)
    first, again = np.asarray(pipe(**kw)), np.asarray(pipe(**kw))  # default: unmerged
    assert np.isfinite(first).all() and np.array_equal(first, again)
    after = np.asarray(pipe.params["transformer_blocks"]["attn"]["to_q"]["kernel"], np.float32)
    assert np.array_equal(after, kernel)  # the base is never touched


def test_pipeline_quantizes_float_params_it_is_given(tiny):
    path, _, inputs = tiny
    model, params = FluxTransformer2DModel.from_pretrained(path)
    float_kernel = params["transformer_blocks"]["attn"]["to_q"]["kernel"]
    pipe = FluxGlancePipeline(model, params, FLUX_SCHEDULER, latent_channels=4, quantize="fp8")
    assert float_kernel.is_deleted()  # donated kernel by kernel: no second copy of the base
    assert quant.kind_of(pipe.params) == "fp8"
    _, loaded = FluxTransformer2DModel.from_pretrained(path, quantize="fp8")
    # XLA may divide by the scale as a multiplication by its reciprocal: the same quantization to an ulp
    err = relative_error(model.apply({"params": pipe.params}, **inputs), model.apply({"params": loaded}, **inputs))
    assert err <= 1e-5


def test_converted_quantized_folder_loads_without_quantizing_again(tiny, tmp_path, monkeypatch, capsys):
    from glance_jax.cli import main
    path, _, inputs = tiny
    dst = tmp_path / "fp8"
    assert main(["convert", str(path), str(dst), "--quantize", "fp8", "--dtype", "fp32"]) == 0
    assert "fp8 kernels, fp32 otherwise" in capsys.readouterr().out
    assert json.load(open(dst / checkpoints.FORMAT_FILE))["quantize"] == "fp8"
    _, direct = FluxTransformer2DModel.from_pretrained(path, quantize="fp8")

    def no_quantizing(*args):
        raise AssertionError("a quantized folder was quantized again")
    monkeypatch.setattr(quant, "quantize_rows", no_quantizing)
    monkeypatch.setattr(quant, "quantize_kernel", no_quantizing)
    model, params = FluxTransformer2DModel.from_pretrained(dst)  # stored fp8: loads as fp8
    assert quant.kind_of(params) == "fp8"
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                                      np.asarray(b, np.float32)), params, direct)
    mesh = sharding.make_mesh("fsdp=1")
    _, on_mesh = FluxTransformer2DModel.from_pretrained(dst, mesh=mesh, quantize="fp8")
    assert on_mesh["transformer_blocks"]["attn"]["to_q"]["kernel"].dtype == jnp.float8_e4m3fn
    with pytest.raises(GlanceError, match="holds a fp8 base; it cannot be loaded as int8"):
        FluxTransformer2DModel.from_pretrained(dst, quantize="int8")


SHARDED_LOAD = """
import sys, numpy as np, jax
from glance_jax import sharding
from glance_jax.models import FluxTransformer2DModel
mesh = sharding.make_mesh("fsdp=2,tensor=2")
_, plain = FluxTransformer2DModel.from_pretrained(sys.argv[1], quantize="int8")
_, sharded = FluxTransformer2DModel.from_pretrained(sys.argv[1], quantize="int8", mesh=mesh)
jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), plain, sharded)
kernel = sharded["transformer_blocks"]["attn"]["to_q"]["kernel"]
scale = sharded["transformer_blocks"]["attn"]["to_q"]["kernel_scale"]
print(kernel.dtype, tuple(kernel.sharding.spec), tuple(scale.sharding.spec))
"""


def test_sharded_quantized_load_equals_the_plain_one(tiny):
    """On 4 host devices (fsdp=2 x tensor=2): each shard is quantized from whole output channels."""
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(tiny[0])], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "int8 (None, 'fsdp', 'tensor') (None, 'tensor')" in out.stdout
    assert sharding.logical_axes(("transformer_blocks", "attn", "to_q", "kernel_scale"), 2) == ("layers", "out")
    assert sharding.logical_axes(("proj_out", "kernel_scale"), 1) == ("out",)


def test_bad_quantization_names(tiny):
    with pytest.raises(GlanceError, match="unknown quantization 'fp4': use one of none, fp8, int8"):
        FluxTransformer2DModel.from_pretrained(tiny[0], quantize="fp4")


# ---- full width: FLUX.1-dev 3072 wide (1 double + 1 single block) and one Qwen-Image block ----

def full_width_references(torch_cls, config, tmp, forward):
    """Saves a random full-width model and returns {"float" | "fp8" | "int8": torch output}, one model at a time."""
    randomize_(torch_cls(**config), seed=3).eval().save_pretrained(tmp)
    outputs = {}
    for kind in ("float", "fp8", "int8"):
        torch_model = torch_cls.from_pretrained(tmp).eval()
        if kind != "float":
            quanto(torch_model, kind)
        outputs[kind] = forward(torch_model)
        del torch_model
        gc.collect()
    return outputs


@pytest.fixture(scope="module")
def flux_full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux_full_quant")
    config = dict(num_layers=1, num_single_layers=1, guidance_embeds=True)
    inputs = flux_inputs(dict(in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768,
                              guidance_embeds=True), batch=1, grid=(16, 16), text_len=64, seed=1)
    return tmp, inputs, full_width_references(TorchFlux, config, tmp, lambda m: torch_forward(m, inputs))


@pytest.fixture(scope="module")
def qwen_full(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen_full_quant")
    inputs = qwen_inputs(dict(in_channels=64, joint_attention_dim=3584), 1, (16, 16), 32,
                         np.array([[1] * 24 + [0] * 8]), seed=2)
    return tmp, inputs, full_width_references(TorchQwen, dict(num_layers=1), tmp,
                                              lambda m: torch_qwen(m, inputs, (16, 16)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_full_width_flux_matches_quanto(flux_full, kind):
    tmp, inputs, want = flux_full
    model, params = FluxTransformer2DModel.from_pretrained(tmp, quantize=kind)
    assert model.num_attention_heads * model.attention_head_dim == 3072
    got = np.asarray(model.apply({"params": params}, **inputs))
    del params
    err, moved = relative_error(got, want[kind]), relative_error(got, want["float"])
    print(f"full-width FLUX {kind}: vs quanto {err:.2e}; vs the unquantized model {moved:.2e}")
    assert err <= TOLERANCE and moved > 10 * TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_full_width_qwen_image_matches_quanto(qwen_full, kind):
    tmp, inputs, want = qwen_full
    model, params = QwenImageTransformer2DModel.from_pretrained(tmp, quantize=kind)
    assert model.num_attention_heads * model.attention_head_dim == 3072
    got = jax_qwen(model, params, inputs, (16, 16))
    del params
    err, moved = relative_error(got, want[kind]), relative_error(got, want["float"])
    print(f"full-width Qwen-Image {kind}: vs quanto {err:.2e}; vs the unquantized model {moved:.2e}")
    assert err <= TOLERANCE and moved > 10 * TOLERANCE


def test_training_on_a_quantized_base_with_bf16_adam_moments(tmp_path):
    """config.model.quantize and config.optim.state_dtype through the trainer, on the demo's teacher."""
    from glance_jax.demo import teacher
    from glance_jax.train import default_config, prepare, train_phases
    from glance_jax.train_step import optimizer
    sample = tmp_path / "sample"
    sample.mkdir()
    images, labels = teacher.digits()
    seven = images[int(np.argmax(labels == 7))]
    states, pooled = teacher.load_prompts()["a handwritten seven"]
    safetensors_io.save_file({"latents": seven, "prompt_embeds": states, "pooled_prompt_embeds": pooled},
                             sample / "seven.safetensors", {data.SCALE_KEY: "1"})  # the teacher's pixels
    Image.fromarray(evaluation.to_uint8(seven)[..., 0]).save(sample / "seven.png")
    (sample / "seven.txt").write_text("a handwritten seven")
    c = default_config("flux", "slow")
    c.model.path, c.model.dtype, c.model.quantize = teacher.TEACHER_DIR, "fp32", "fp8"
    c.data.dir, c.data.resolution, c.data.multiple = str(sample), 8, 2
    c.data.cache_dir = str(tmp_path / "cache")
    c.lora.rank, c.lora.alpha, c.steps, c.checkpoint.every, c.optim.warmup_steps = 4, 16.0, 3, 3, 1
    c.optim.state_dtype = "bf16"
    c.schedule.slow_steps, c.schedule.fast_steps = (1, 3, 5, 7, 9), (11, 21, 31, 41, 50)
    run = prepare(c, tmp_path / "run")
    assert quant.kind_of(run.params) == "fp8"
    tree = load_lora(train_phases(run)["slow"], run.params)
    assert float(jnp.abs(tree["transformer_blocks"]["attn"]["to_q"]["B"]).max()) > 0  # the LoRA learned
    moments = [x for x in jax.tree_util.tree_leaves(optimizer(c.optim).init(tree)) if x.ndim]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
