"""Qwen2.5-VL with its vision tower (Qwen-Image-Edit's text encoder), the Qwen2-VL image processor and
Qwen-Image-Edit's prompt encoding, against transformers 5.25 and diffusers 0.42 (fp32; tiny random models with
Qwen2.5-VL's real vocabulary size and special token ids; the real Qwen2.5 tokenizer from tests/real_tokenizers.py).

transformers' `Qwen2VLProcessor` needs torchvision for its video processor (even for images); the processor the
references use is built without one, around transformers' PIL image processor (`Qwen2VLImageProcessorPil`).
"""

import json
from unittest import mock

import jax
from flax.traverse_util import unflatten_dict
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2VLImageProcessorPil, Qwen2VLProcessor
from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwenVL
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.processing_utils import ProcessorMixin

from glance_jax import checkpoints
from glance_jax.checkpoints import safetensors_io
from glance_jax.qwen_image_edit.processor import QwenVLImageProcessor, expand_image_pads
from glance_jax.qwen_image_edit.prompts import QwenImageEditPromptEncoder, vl_image
from glance_jax.qwen_image_edit.text_encoder import Qwen25VLModel, sequential_positions
from glance_jax.qwen_image_edit.vision import Qwen25VisionTransformer, vision_fields, vision_layout
import real_tokenizers
from torch_peers import randomize_

TOLERANCE = 1e-4  # max abs error of fp32 hidden states (values of order 1)
PIXEL_TOLERANCE = 1e-6  # the image processor: the same arithmetic in numpy
IMAGE_TOKEN = 151655
VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
              spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1, 3])  # windows of 2 x 2 merged tokens
QWEN_VL = Qwen2_5_VLConfig(
    text_config=dict(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}),
    vision_config=dict(VISION, depth=2, fullatt_block_indexes=[1]))
# the Qwen-Image-Edit repository's processor/preprocessor_config.json
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor"}


def random_image(width, height, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = len(mode)
    smooth = rng.uniform(0, 255, (height // 8 + 2, width // 8 + 2, channels)).astype(np.uint8)  # some structure
    base = np.asarray(Image.fromarray(smooth.squeeze(), mode).resize((width, height), Image.Resampling.BILINEAR))
    noise = rng.integers(-20, 20, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode)


def tame_patch_embed_(model):
    """randomize_ scales a Conv3d weight by its input channels (3); by its fan-in (3 x 2 x 14 x 14) activations
    stay of order 1, so that absolute errors mean something."""
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(np.sqrt(3 / model.patch_embed.proj.weight[0].numel()))
    return model


def processor_without_torchvision(image_processor, tokenizer):
    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, argument):
        return None if name == "video_processor" and argument is None else original(self, name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A Qwen-Image-Edit pipeline folder (text_encoder/, tokenizer/, processor/) and its torch reference parts."""
    root = tmp_path_factory.mktemp("qwen_edit")
    real_tokenizers.qwen_tokenizer(root / "tokenizer")
    AutoTokenizer.from_pretrained(root / "tokenizer").save_pretrained(root / "processor")
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImageEditPipeline", "processor": ["transformers", "Qwen2VLProcessor"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"]}))
    torch_model = randomize_(TorchQwenVL(QWEN_VL), seed=7).eval()
    tame_patch_embed_(torch_model.model.visual)
    torch_model.save_pretrained(root / "text_encoder")
    processor = processor_without_torchvision(Qwen2VLImageProcessorPil.from_pretrained(root / "processor"),
                                              AutoTokenizer.from_pretrained(root / "processor"))
    return root, torch_model, processor


def test_the_tokenizer_has_the_vision_tokens(pipeline):
    root, _, processor = pipeline
    ids = processor.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    assert ids == [151652, IMAGE_TOKEN, 151653]
    assert processor.image_token_id == IMAGE_TOKEN == QWEN_VL.image_token_id


def test_vision_tower_matches_transformers():
    """Two images of different grids, window attention split into several windows per image."""
    config = Qwen2_5_VLConfig(vision_config=VISION).vision_config
    torch_model = tame_patch_embed_(randomize_(Qwen2_5_VisionTransformerPretrainedModel(config), seed=3).eval())
    grids = ((1, 4, 6), (1, 8, 4))
    layout = vision_layout(grids, 2, 56, 14)
    assert len(layout["full"][0]) == 2 and len(layout["windows"][0]) == 4  # 2 images, 2 windows each
    pixels = np.random.default_rng(0).standard_normal((56, 3 * 2 * 14 * 14)).astype(np.float32)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(pixels), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    model = Qwen25VisionTransformer(**vision_fields(config.to_dict()))
    table = checkpoints.weight_table(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), pixels, grids)["params"]))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert set(table) == set(state)  # transformers' names, under the vision prefix
    params = unflatten_dict({slot.path: slot.to_flax(state[name]) for name, slot in table.items()})
    got = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, grids))(params, pixels))
    error = float(np.abs(got - want).max())
    print(f"vision tower, grids {grids}: max abs error {error:.2e} (outputs up to {np.abs(want).max():.2f})")
    assert got.shape == want.shape == (14, 32)
    assert error < TOLERANCE, f"vision tower: max abs error {error:.2e} >= {TOLERANCE}"


def test_text_encoder_matches_transformers(pipeline, tmp_path):
    """A batch of two prompts of different lengths (padding), one image each: the final hidden states at the real
    tokens, with multimodal positions (transformers given mm_token_type_ids) and with sequential ones (not)."""
    root, torch_model, processor = pipeline
    images = [random_image(61, 97, 1), random_image(130, 45, 2)]
    texts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>make the sky red<|im_end|>",
             "a photo <|vision_start|><|image_pad|><|vision_end|>two small dogs sitting on grass in snow"]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    model, params = Qwen25VLModel.from_pretrained(root)  # the pipeline folder: its text_encoder/
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    grids = tuple(tuple(g) for g in inputs["image_grid_thw"].tolist())
    pixels = inputs["pixel_values"].numpy()
    assert not mask.all() and (ids == IMAGE_TOKEN).sum() > 0
    encode = jax.jit(lambda p, i, m, x, pos: model.apply({"params": p}, i, m, x, grids, pos))
    real = mask.astype(bool)
    results = {}
    for mode, positions, extra in (
            ("multimodal positions", model.positions(ids, mask, grids),
             {"mm_token_type_ids": inputs["mm_token_type_ids"]}),
            ("sequential positions", sequential_positions(*ids.shape), {})):
        with torch.no_grad():
            want = torch_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                               output_hidden_states=True, **extra).hidden_states[-1].numpy()
        got = results[mode] = np.asarray(encode(params, ids, mask, pixels, positions))
        error = float(np.abs(got - want)[real].max())
        print(f"Qwen25VLModel, {mode}: max abs error {error:.2e} at real tokens (values up to "
              f"{np.abs(want[real]).max():.2f})")
        assert error < TOLERANCE, f"{mode}: max abs error {error:.2e} >= {TOLERANCE}"
    unjitted = model.apply({"params": params}, ids, mask, pixels, grids)  # positions computed from the ids
    np.testing.assert_allclose(np.asarray(unjitted)[real], results["multimodal positions"][real], atol=1e-5)

    # transformers 5 names (model.language_model.*, model.visual.*) and a converted folder load the same
    f = safetensors_io.SafetensorsFile(root / "text_encoder" / "model.safetensors")
    renamed = tmp_path / "new_names"
    renamed.mkdir()
    (renamed / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
    rename = lambda k: k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else \
        k.replace("visual.", "model.visual.", 1) if k.startswith("visual.") else k
    assert any(k.startswith("visual.") for k in f.keys())
    safetensors_io.save_file({rename(k): f.read(k) for k in f.keys()}, renamed / "model.safetensors")
    classes = {"Qwen25VLModel": Qwen25VLModel, "Qwen2_5_VLForConditionalGeneration": Qwen25VLModel}
    checkpoints.convert_checkpoint(root / "text_encoder", tmp_path / "converted", classes, dtype="fp32")
    for path in (renamed, tmp_path / "converted"):
        again, loaded = Qwen25VLModel.from_pretrained(path)
        assert again == model
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_image_processor_matches_transformers(pipeline):
    root, _, processor = pipeline
    ours = QwenVLImageProcessor.from_pretrained(root / "processor")
    assert ours == QwenVLImageProcessor()  # the repository's settings are Qwen2.5-VL's, the defaults
    small = dict(PREPROCESSOR, max_pixels=28 * 28 * 12, min_pixels=28 * 28 * 6)  # both limits at work
    cases = [(processor.image_processor, ours,
              [random_image(61, 97, 1), random_image(130, 45, 2), random_image(50, 33, 3, "RGBA"),
               random_image(333, 250, 4).convert("L")]),
             (Qwen2VLImageProcessorPil(**small), QwenVLImageProcessor.from_config(small),
              [random_image(300, 201, 5), random_image(20, 31, 6)])]
    for reference, processor_, images in cases:
        want = reference(images=images, return_tensors="np")
        pixels, grids = processor_(images)
        error = float(np.abs(pixels - want["pixel_values"]).max())
        print(f"image processor, grids {grids}: max abs error {error:.1e}")
        assert grids == tuple(tuple(g) for g in want["image_grid_thw"].tolist())
        assert pixels.shape == want["pixel_values"].shape and pixels.dtype == np.float32
        assert error < PIXEL_TOLERANCE, f"pixel_values: max abs error {error:.1e} >= {PIXEL_TOLERANCE}"
    texts = processor.tokenizer.batch_decode(processor(
        text=["a <|image_pad|> b", "<|image_pad|><|image_pad|>"], images=images[:1] * 3, padding=False)["input_ids"])
    pixels, grids = ours(images[:1] * 3)
    assert expand_image_pads(["a <|image_pad|> b", "<|image_pad|><|image_pad|>"], grids, 2) == texts


def test_vl_image_is_the_pipelines_resize():
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as edit_dimensions
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as plus_dimensions
    resize = VaeImageProcessor(vae_scale_factor=16).resize  # the pipelines' image_processor
    for image in (random_image(300, 201, 1), random_image(97, 240, 2)):
        width, height, _ = edit_dimensions(1024 * 1024, image.width / image.height)
        np.testing.assert_array_equal(np.asarray(vl_image(image)), np.asarray(resize(image, height, width)))
        width, height = plus_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
        np.testing.assert_array_equal(np.asarray(vl_image(image, plus=True)), np.asarray(resize(image, height, width)))


def _compare(got, want_embeds, want_mask, what):
    error = float(np.abs(np.asarray(got["prompt_embeds"]) - want_embeds.numpy()).max())
    print(f"{what}: prompt_embeds {tuple(want_embeds.shape)}, max abs error {error:.2e}")
    assert got["prompt_embeds"].shape == tuple(want_embeds.shape)
    assert error < TOLERANCE, f"{what}: max abs error {error:.2e} >= {TOLERANCE}"
    if want_mask is None:
        assert "prompt_embeds_mask" not in got
    else:
        np.testing.assert_array_equal(np.asarray(got["prompt_embeds_mask"]), want_mask.numpy())


def _with_mm_token_types(torch_model):
    """The text encoder as diffusers' fix (PR #14189) calls it: given the processor's mm_token_type_ids."""
    forward = torch_model.forward
    torch_model.forward = lambda *a, input_ids=None, **kw: forward(
        *a, input_ids=input_ids, mm_token_type_ids=(input_ids == IMAGE_TOKEN).long(), **kw)
    return torch_model


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_prompt_encoding_matches_diffusers(pipeline, plus):
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    root, torch_model, processor = pipeline
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    reference = cls(scheduler=None, vae=None, text_encoder=torch_model, tokenizer=processor.tokenizer,
                    processor=processor, transformer=None)
    encoder = QwenImageEditPromptEncoder.from_pretrained(root, plus=plus)
    first, second = random_image(61, 97, 1), random_image(130, 45, 2)
    prompts = ["make the sky red", "add two small dogs sitting on grass in snow under a blue sky"]
    if plus:  # diffusers gives every prompt all the images (one prompt per call); ours takes a list per prompt
        calls = [(prompts[0], [first, second]), (prompts[1], [second])]
        images = [[first, second], [second]]
    else:
        calls = [(prompts, [first, second])]
        images = [first, second]
    for mrope in (True, False):
        encoder.mrope = mrope
        try:
            _with_mm_token_types(torch_model) if mrope else None
            with torch.no_grad():
                wants = [reference.encode_prompt(p, image=i) for p, i in calls]
        finally:
            torch_model.__dict__.pop("forward", None)
        embeds, mask = wants[0]
        if plus:  # the two calls padded as one batch
            length = max(e.shape[1] for e, _ in wants)
            embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in wants])
            mask = torch.stack([torch.arange(length) < e.shape[1] for e, _ in wants]).long()
        what = f"{'Plus' if plus else 'Edit'} encode_prompt, {'multimodal' if mrope else 'sequential'} positions"
        _compare(encoder(prompts, images), embeds, mask, what)
