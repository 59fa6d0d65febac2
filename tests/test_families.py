"""The family record: every family question has one answer, and nothing outside it tells the families apart
by a class name or a parameter key."""

import ast
import pathlib
import re

import jax
import pytest
from flax.traverse_util import flatten_dict

from glance_jax import families, lora
from glance_jax.errors import GlanceError
from glance_jax.models import (AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel,
                               QwenImageTransformer2DModel)

PACKAGE = pathlib.Path(families.__file__).parent
# a family folder has the family's adapter.py; one may build on another's (FLUX.1 Kontext on FLUX.1)
FAMILY_FOLDERS = sorted(path.parent for path in PACKAGE.glob("*/adapter.py"))
TINY = {families.FLUX: FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                              num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                              axes_dims_rope=(4, 6, 6)),
        families.QWEN_IMAGE: QwenImageTransformer2DModel(in_channels=16, out_channels=4, num_layers=1,
                                                         attention_head_dim=16, num_attention_heads=2,
                                                         joint_attention_dim=16, axes_dims_rope=(4, 6, 6))}


def test_each_model_class_belongs_to_its_family():
    assert families.of(FluxTransformer2DModel()) is families.of(AutoencoderKL) is families.FLUX
    assert families.of(QwenImageTransformer2DModel) is families.of(AutoencoderKLQwenImage()) is families.QWEN_IMAGE
    assert families.of_class_name("QwenImageTransformer2DModel") is families.get("qwen-image")
    with pytest.raises(GlanceError, match="no model family"):
        families.of(dict)
    with pytest.raises(GlanceError, match="unknown model family 'sdxl'"):
        families.get("sdxl")


def test_only_flux_layouts_take_bfl_lora_names():
    """A family's LoRA file-name table applies to the models laid out as that family's: BFL names to FLUX.1's
    tree and to no other (a Qwen-Image tree shares diffusers' attention names, but not FLUX.1's layout)."""
    names = families.FLUX.lora_file_names
    for family, model in TINY.items():
        params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
        found = names.file_modules(params, lora.dense_layers(params))
        assert bool(found) == (family is families.FLUX)
    flux = jax.eval_shape(TINY[families.FLUX].init_params, jax.random.PRNGKey(0))
    assert "double_blocks.0.img_attn.qkv" in names.file_modules(flux, lora.dense_layers(flux))


def test_conditioning_builds_the_inputs_the_model_takes():
    for family, model in TINY.items():
        inputs = model.example_inputs()
        out = jax.eval_shape(lambda: model.apply({"params": model.init_params(jax.random.PRNGKey(0))}, **inputs))
        assert out.shape == inputs["hidden_states"].shape[:2] + (model.in_channels if family is families.FLUX
                                                                 else 4 * model.out_channels,)


def test_lora_presets_come_from_the_families():
    assert families.lora_preset("flux") == families.FLUX.lora_targets
    assert families.lora_preset("qwen-image-all") == families.QWEN_IMAGE.lora_targets_all
    with pytest.raises(GlanceError, match="unknown LoRA preset 'sdxl'"):
        families.lora_preset("sdxl")


def test_no_family_is_told_apart_outside_the_record():
    """A class-name comparison or a test for a parameter key, anywhere in glance_jax but families.py."""
    sniffing = re.compile(r"__name__ ==|\.__name__ in|startswith\(\"(Flux|QwenImage)|\"(x_embedder|img_in|"
                          r"single_transformer_blocks|txt_norm)\" in|== \"(flux|qwen-image)\"|in_channels ?// ?4")
    found = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "families.py"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if sniffing.search(line) and "__main__" not in line]
    assert not found, found


def _family_names():
    """{identifier: family folder} of what only one family has: the classes and functions its folder defines, and
    the parameter keys of its transformer that no other family's has."""
    owned = {}  # the functions a family folder implements under the names the shared code asks for are not its own
    protocol = {"recognises", "strip_prefix", "config_from_shapes", "to_diffusers", "file_modules", "kohya_tensors",
                "guidance_embedder_at"}
    for folder in FAMILY_FOLDERS:
        for path in folder.glob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_") and \
                        node.name not in protocol:
                    owned[node.name] = folder.name
    # diffusers' compound module names (x_embedder, img_mod.1); plain words such as norm or linear tell nothing
    keys = {family: {k for path in flatten_dict(jax.eval_shape(model.init_params, jax.random.PRNGKey(0)))
                     for k in path if "_" in k} for family, model in TINY.items()}
    for family, mine in keys.items():
        others = set().union(*(k for f, k in keys.items() if f is not family))
        owned.update({k: family.transformer.__module__.split(".")[1] for k in mine - others})
    return owned


# The one file outside the family folders that names family classes by design: the public facade of the Flax
# classes (`from glance_jax.models import FluxTransformer2DModel`, the names the API has always had).
BY_DESIGN = {"models/__init__.py"}


def _names_in_code(source):
    """(line, name) of every identifier, attribute and string literal of a module (docstrings and comments left
    out: prose may speak of a family); a dotted string counts its parts too."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.alias):
            yield node.lineno, node.name.split(".")[-1]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for token in re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", node.value):
                yield from ((node.lineno, name) for name in {token, *token.split(".")})


def test_nothing_outside_a_family_folder_names_what_only_that_family_has():
    owned = _family_names()
    assert {"FluxTransformer2DModel", "QwenImagePromptEncoder", "x_embedder", "img_mod.1"} <= set(owned)
    folders = {folder.name for folder in FAMILY_FOLDERS}
    assert set(owned.values()) <= folders
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in folders or str(relative) in BY_DESIGN:
            continue
        found += sorted({f"{relative}:{n}: {name}" for n, name in _names_in_code(path.read_text()) if name in owned})
    assert not found, found
