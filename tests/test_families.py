"""The family record: every family question has one answer, and nothing outside it tells the families apart
by a class name or a parameter key."""

import pathlib
import re

import jax
import pytest

from glance_jax import families, lora
from glance_jax.errors import GlanceError
from glance_jax.models import (AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel,
                               QwenImageTransformer2DModel)

PACKAGE = pathlib.Path(families.__file__).parent
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


@pytest.mark.parametrize("family", families.FAMILIES, ids=families.NAMES)
def test_parameter_and_lora_trees_tell_their_family(family):
    params = jax.eval_shape(TINY[family].init_params, jax.random.PRNGKey(0))
    assert families.of_params(params) is family
    for preset in (family.name, family.name + "-all"):
        tree = jax.eval_shape(lambda p: lora.init_lora(jax.random.PRNGKey(0), p, preset, 2, 8.0), params)
        assert families.of_params(tree) is family
    assert families.of_params({"transformer_blocks": {"attn": {}}}) is None  # attention alone does not tell


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
                          r"single_transformer_blocks|txt_norm)\" in|== \"(flux|qwen-image)\"")
    found = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "families.py"
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if sniffing.search(line) and "__main__" not in line]
    assert not found, found
