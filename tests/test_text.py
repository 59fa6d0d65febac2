"""The Flax text encoders against transformers, and prompt encoding against diffusers' pipelines (fp32, tiny
random encoders with the real vocabulary sizes, the real tokenizers of FLUX.1-dev and Qwen-Image built from
installed packages by tests/real_tokenizers.py: no hub)."""

import logging

import jax
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig, T5Config
from transformers import CLIPTextModel as TorchCLIP
from transformers import Qwen2_5_VLForConditionalGeneration as TorchQwenVL
from transformers import T5EncoderModel as TorchT5

from glance_jax import checkpoints, data, families
from glance_jax.checkpoints import safetensors_io
from glance_jax.flux.prompts import FluxPromptEncoder
from glance_jax.qwen_image.prompts import QwenImagePromptEncoder
from glance_jax.models import CLIPTextModel, Qwen25VLTextModel, T5EncoderModel
import real_tokenizers
from torch_peers import randomize_, relative_error

TOLERANCE = 1e-4
WORDS = ("a photo of the red fox cat dog sitting on grass in snow under blue sky with two small big old "
         "painting describe image by detailing color shape size texture quantity text spatial relationships "
         "objects and background system user assistant").split()
# the vocabularies and special token ids of FLUX.1-dev's CLIP-L (eos_token_id 2: transformers' legacy pooling at
# the highest id, <|endoftext|>) and T5-XXL and of Qwen-Image's Qwen2.5-VL; tiny everywhere else
CLIP = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, pad_token_id=1,
                      eos_token_id=2)
T5 = T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu")
QWEN = Qwen2_5_VLConfig(text_config=dict(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                          "mrope_section": [1, 1, 2]}),
                        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                           out_hidden_size=32))


def word_tokenizer(path, specials, template, max_length):
    """A word-level fast tokenizer with the given special tokens and post-processing template."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", *specials, *WORDS, ":", ",", "."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if template:
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
            (s, vocab[s]) for s in specials if s in template])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   model_max_length=max_length, additional_special_tokens=list(specials))
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    torch_models = {}
    for name, model in (("text_encoder", TorchCLIP(CLIP)), ("text_encoder_2", TorchT5(T5)),
                        ("qwen/text_encoder", TorchQwenVL(QWEN))):
        randomize_(model, seed=len(name)).eval().save_pretrained(root / name)
        torch_models[name] = model
    real_tokenizers.clip_tokenizer(root / "tokenizer")
    real_tokenizers.t5_tokenizer(root / "tokenizer_2")
    real_tokenizers.qwen_tokenizer(root / "qwen" / "tokenizer")
    return root, torch_models


def test_the_real_tokenizers_give_the_official_ids(folders):
    from transformers import AutoTokenizer

    from glance_jax.qwen_image.prompts import QWEN_TEMPLATE, QWEN_TEMPLATE_TOKENS
    root, _ = folders
    clip, t5 = AutoTokenizer.from_pretrained(root / "tokenizer"), AutoTokenizer.from_pretrained(root / "tokenizer_2")
    qwen = AutoTokenizer.from_pretrained(root / "qwen" / "tokenizer")
    assert (len(clip), clip.model_max_length, clip.bos_token_id, clip.eos_token_id) == (49408, 77, 49406, 49407)
    assert clip("a photo of a red fox").input_ids == [49406, 320, 1125, 539, 320, 736, 3240, 49407]
    assert (len(t5), t5.model_max_length, t5.eos_token_id, t5.pad_token_id) == (32100, 512, 1, 0)
    assert len(qwen) == 151665 and qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == \
        [151643, 151644, 151645]
    prefix = qwen(QWEN_TEMPLATE.split("{}")[0]).input_ids  # the template tokens diffusers drops
    assert len(prefix) == QWEN_TEMPLATE_TOKENS and prefix[0] == 151644


IDS = np.array([[2, 10, 11, 12, 13, 3, 0, 0, 0], [2, 14, 15, 16, 17, 18, 19, 20, 3]])
MASK = (IDS != 0).astype(np.int64)


@pytest.mark.parametrize("name,cls", [("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel),
                                      ("qwen/text_encoder", Qwen25VLTextModel)])
def test_encoders_match_transformers(folders, name, cls):
    root, torch_models = folders
    model, params = cls.from_pretrained(root / name)
    with torch.no_grad():
        out = torch_models[name](input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK),
                                 output_hidden_states=True)
    got = model.apply({"params": params}, IDS, MASK)
    if cls is CLIPTextModel:
        errors = (relative_error(got[0], out.last_hidden_state.numpy()),
                  relative_error(got[1], out.pooler_output.numpy()))
    elif cls is T5EncoderModel:
        errors = (relative_error(got, out.last_hidden_state.numpy()),)
    else:
        errors = (relative_error(got, out.hidden_states[-1].numpy()),)
    print(f"{cls.__name__}, batch 2 with padding: {', '.join(f'{e:.2e}' for e in errors)}")
    assert max(errors) <= TOLERANCE


def test_bf16_close_to_fp32(folders):
    root, _ = folders
    m32, p32 = T5EncoderModel.from_pretrained(root / "text_encoder_2")
    m16, p16 = T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype="bf16")
    err = relative_error(np.asarray(m16.apply({"params": p16}, IDS, MASK), np.float32),
                         np.asarray(m32.apply({"params": p32}, IDS, MASK)))
    print(f"T5 bf16 vs fp32: {err:.2e}")
    assert err <= 5e-2


def test_hub_layouts_and_conversion(folders, tmp_path):
    """Hub checkpoints name CLIP's weights text_model.*, keep T5's tied embedding and Qwen's vision tower."""
    root, _ = folders
    f = safetensors_io.SafetensorsFile(root / "text_encoder" / "model.safetensors")
    legacy = tmp_path / "clip_legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
    safetensors_io.save_file({f"text_model.{k}": f.read(k) for k in f.keys()}, legacy / "model.safetensors")
    model, params = CLIPTextModel.from_pretrained(legacy)
    _, want = CLIPTextModel.from_pretrained(root / "text_encoder")
    np.testing.assert_array_equal(params["final_layer_norm"]["scale"], want["final_layer_norm"]["scale"])
    for name in ("text_encoder", "text_encoder_2", "qwen/text_encoder"):
        checkpoints.convert_checkpoint(root / name, tmp_path / name.replace("/", "_"), families.CLASSES, dtype="fp32")
        again, converted = families.load_model(tmp_path / name.replace("/", "_"))
        original_model, original = families.load_model(root / name)
        assert again == original_model
        jax.tree_util.tree_map(np.testing.assert_array_equal, converted, original)


def test_flux_prompt_encoding_matches_diffusers(folders, caplog):
    from diffusers import FluxPipeline
    from transformers import AutoTokenizer
    root, torch_models = folders
    reference = FluxPipeline(scheduler=None, vae=None, text_encoder=torch_models["text_encoder"],
                             tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
                             text_encoder_2=torch_models["text_encoder_2"],
                             tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2"), transformer=None)
    prompts = ["a photo of a red fox", "two small dogs sitting on grass in snow under blue sky"]
    with torch.no_grad():
        want = reference.encode_prompt(prompts, prompt_2=None, max_sequence_length=24)
    encoder = FluxPromptEncoder.from_pretrained(root, max_sequence_length=24)
    encoded = encoder(prompts)
    assert sorted(encoded) == ["pooled_prompt_embeds", "prompt_embeds"]
    embeds, pooled = encoded["prompt_embeds"], encoded["pooled_prompt_embeds"]
    errors = relative_error(embeds, want[0].numpy()), relative_error(pooled, want[1].numpy())
    print(f"FLUX encode_prompt vs diffusers: T5 {errors[0]:.2e}, CLIP pooled {errors[1]:.2e}")
    assert max(errors) <= TOLERANCE and embeds.shape == (2, 24, 32)
    long = " ".join(["fox"] * 30)
    with caplog.at_level(logging.WARNING, logger="glance_jax"):
        encoder([long])
    assert f"{len(reference.tokenizer_2(long).input_ids) - 24} token(s) cut" in caplog.text


def test_qwen_prompt_encoding_matches_diffusers(folders):
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer
    root, torch_models = folders
    reference = QwenImagePipeline(scheduler=None, vae=None, text_encoder=torch_models["qwen/text_encoder"],
                                  tokenizer=AutoTokenizer.from_pretrained(root / "qwen" / "tokenizer"),
                                  transformer=None)
    prompts = ["a red fox", "two small dogs sitting on grass in snow"]
    with torch.no_grad():
        want_embeds, want_mask = reference.encode_prompt(prompts)
    encoded = QwenImagePromptEncoder.from_pretrained(root / "qwen")(prompts)
    embeds, mask = encoded["prompt_embeds"], encoded["prompt_embeds_mask"]  # the prompts differ in length
    err = relative_error(embeds, want_embeds.numpy())
    print(f"Qwen-Image encode_prompt vs diffusers: {err:.2e}, shapes {embeds.shape}")
    assert err <= TOLERANCE and embeds.shape == tuple(want_embeds.shape)
    np.testing.assert_array_equal(np.asarray(mask), want_mask.numpy())


def test_pipeline_prompts_and_trainer_captions_without_pytorch(folders, tmp_path):
    """`pipeline(prompt=...)` and the trainer's caption both go through the Flax encoders."""
    import shutil

    from diffusers import FluxTransformer2DModel as TorchFlux
    from sklearn.datasets import load_sample_images

    from glance_jax.models import FluxTransformer2DModel
    from glance_jax.pipelines import FluxGlancePipeline
    from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
    from glance_jax.train import default_config, prepare, train_phases
    root, _ = folders
    config = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    randomize_(TorchFlux(**config), seed=0).save_pretrained(tmp_path / "transformer")
    model, params = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    encoder = FluxPromptEncoder.from_pretrained(root, max_sequence_length=16)
    pipe = FluxGlancePipeline(model, params, FLUX_SCHEDULER, prompt_encoder=encoder)
    by_string = pipe(prompt=["a red fox"], height=32, width=32, num_inference_steps=2, seed=0)
    by_embeds = pipe(**encoder(["a red fox"]), height=32, width=32, num_inference_steps=2, seed=0)
    np.testing.assert_array_equal(np.asarray(by_string), np.asarray(by_embeds))

    sample = tmp_path / "sample"
    sample.mkdir()
    shutil.copy(load_sample_images().filenames[0], sample / "china.jpg")
    (sample / "china.txt").write_text("a red fox sitting in snow")
    rng = np.random.default_rng(0)
    [s] = data.find_samples(str(sample), 128)
    safetensors_io.save_file({"latents": rng.standard_normal((s.height // 8, s.width // 8, 16), dtype=np.float32)},
                             sample / "china.safetensors")  # latents only: the caption is encoded here
    c = default_config("flux", "slow")
    c.model.path, c.model.text_encoder_path, c.model.dtype = str(tmp_path / "transformer"), str(root), "fp32"
    c.data.dir, c.data.resolution, c.data.cache_dir = str(sample), 128, str(tmp_path / "cache")
    c.steps, c.lora.rank, c.lora.alpha = 2, 4, 16.0
    c.teacher.prompts = ("a grey wolf", "a cat")  # extra captions for the teacher's trajectories
    run = prepare(c, tmp_path / "run")
    want = FluxPromptEncoder.from_pretrained(root)(["a red fox sitting in snow", "a grey wolf", "a cat"])
    want, want_pooled = want["prompt_embeds"], want["pooled_prompt_embeds"]
    assert relative_error(run.batch["cond"]["encoder_hidden_states"][0], np.asarray(want[0])) <= TOLERANCE
    assert relative_error(run.batch["cond"]["pooled_projections"][0], np.asarray(want_pooled[0])) <= TOLERANCE
    texts = run.batch["teacher_texts"]  # the caption, then the extra ones: (3, 1, ...)
    assert relative_error(texts["encoder_hidden_states"][:, 0], np.asarray(want)) <= TOLERANCE
    assert relative_error(texts["pooled_projections"][:, 0], np.asarray(want_pooled)) <= TOLERANCE
    assert "empty_cond" in run.batch  # the empty prompt " " is encoded too, for caption dropout
    train_phases(run)
    assert prepare(c, tmp_path / "run").cache_hit


def test_qwen_pipeline_takes_prompt_strings(folders, tmp_path):
    from diffusers import QwenImageTransformer2DModel as TorchQwen

    from glance_jax.models import QwenImageTransformer2DModel
    from glance_jax.pipelines import QwenImageGlancePipeline
    from glance_jax.qwen_image.adapter import SCHEDULER as QWEN_IMAGE_SCHEDULER
    root, _ = folders
    randomize_(TorchQwen(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6]), seed=0
               ).save_pretrained(tmp_path)
    model, params = QwenImageTransformer2DModel.from_pretrained(tmp_path)
    encoder = QwenImagePromptEncoder.from_pretrained(root / "qwen")
    pipe = QwenImageGlancePipeline(model, params, QWEN_IMAGE_SCHEDULER, prompt_encoder=encoder)
    kw = dict(height=32, width=48, num_inference_steps=2, true_cfg_scale=5.0, seed=[0, 1])
    by_string = pipe(prompt=["a red fox", "two dogs on grass"], negative_prompt=" ", **kw)
    encoded, negative = encoder(["a red fox", "two dogs on grass"]), encoder([" ", " "])
    by_embeds = pipe(encoded["prompt_embeds"], encoded.get("prompt_embeds_mask"), negative["prompt_embeds"],
                     negative.get("prompt_embeds_mask"), **kw)
    np.testing.assert_array_equal(np.asarray(by_string), np.asarray(by_embeds))
