"""The one training sample: a folder of images with same-name .txt captions, validated, sized and encoded.

The official layout is `DIR/name.png` (or .jpg, .jpeg, .webp) beside
`DIR/name.txt`. Every image is checked before any training starts. Images are
resized so that the long side is the training resolution (never upscaled)
and centre-cropped to a multiple of `multiple` pixels.

Encoded arrays (latents and text embeddings) are cached on disk under a key
that hashes the image bytes, the caption, the training size and the encoder's
identity, so a second run skips the encoders. With `config.model.vae_path` the
Flax VAE encodes the image (`VAEEncoder`), with `config.model.text_encoder_path`
the Flax text encoders encode the caption and the empty prompt
(`FlaxTextEncoder`); whatever neither gives comes from `PrecomputedEncoder`:
a `name.safetensors` file beside the image, written by any tool, with these
arrays (FLUX):
- `latents` (H/8, W/8, 16): the VAE latent mean of the resized, cropped image,
  normalised as diffusers trains on it: `(mean - shift_factor) * scaling_factor`;
- `prompt_embeds` (T, 4096): T5 hidden states of the caption;
- `pooled_prompt_embeds` (768,): the CLIP pooled output of the caption;
- for caption dropout, `empty_prompt_embeds` and `empty_pooled_prompt_embeds`
  for the empty prompt " ", shaped like the two above.
For Qwen-Image: `latents` (H/8, W/8, 16) normalised as its pipeline does,
`(mean - latents_mean) / latents_std`; `prompt_embeds` (T, 3584) and optionally
`prompt_embeds_mask` (T,) (1 = real token); for caption dropout
`empty_prompt_embeds` (T', 3584) and optionally `empty_prompt_embeds_mask`.
Latents of another VAE scale (the demo teacher's are its pixels) say so in the
file's metadata: `vae_scale_factor` (pixels per latent, default the family's).
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import warnings

import jax
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from glance_jax import checkpoints, families, pipelines, safe_io, validation
from glance_jax.checkpoints import safetensors_io
from glance_jax.errors import GlanceError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")



@dataclasses.dataclass
class Sample:
    image_path: str
    caption: str
    width: int  # training size in pixels, after resizing and cropping
    height: int
    sources: tuple = ()  # an edit's source images (config.data.sources), each the edited image's size


def source_key(index):
    """The encoded sample's array of source image `index`'s latents (an edit; the edited image is `latents`)."""
    return f"source_latents_{index}"


def training_size(width, height, resolution, multiple):
    """(width, height) after scaling the long side to `resolution` and cropping to a multiple of `multiple`."""
    scale = resolution / max(width, height)
    w, h = round(width * scale), round(height * scale)
    return w - w % multiple, h - h % multiple


def find_samples(folder, resolution, multiple=32, source_dirs=()):
    """All image/caption pairs of `folder`, validated; raises one GlanceError naming the first problem. For an
    edit, each of `source_dirs` holds a source image under each image's name (any image extension), of its size:
    the image is the edit, its caption the instruction."""
    if not os.path.isdir(folder):
        raise GlanceError(f"{folder}: no such folder (config.data.dir)")
    images = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise GlanceError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the training folder")
    samples = []
    for name in images:
        path = os.path.join(folder, name)
        caption_path = os.path.splitext(path)[0] + ".txt"
        if not os.path.isfile(caption_path):
            raise GlanceError(f"{path}: no caption ({os.path.basename(caption_path)} is missing)")
        caption = validation.read_text(caption_path, "caption").strip()
        if not caption:
            raise GlanceError(f"{caption_path}: the caption is empty")
        try:
            with _opened(path) as image:
                image.verify()
            with _opened(path) as image:
                width, height = ImageOps.exif_transpose(image).size  # the size as the user sees it
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise GlanceError(f"{path}: unreadable image ({e})") from None
        if max(width, height) < resolution:
            raise GlanceError(f"{path}: {width}x{height} is smaller than the training resolution {resolution} "
                              "(long side); images are not upscaled")
        w, h = training_size(width, height, resolution, multiple)
        if min(w, h) < multiple:
            raise GlanceError(f"{path}: {width}x{height} is too narrow to crop to a multiple of {multiple}")
        samples.append(Sample(path, caption, w, h, tuple(_source(path, d, (width, height)) for d in source_dirs)))
    return samples


def _source(path, folder, size):
    """The source image in `folder` of the edited image at `path`, checked to be readable and of its `size`."""
    if not os.path.isdir(folder):
        raise GlanceError(f"{folder}: no such folder (config.data.sources)")
    stem = os.path.splitext(os.path.basename(path))[0]
    found = [n for n in sorted(os.listdir(folder)) if os.path.splitext(n)[0] == stem and
             n.lower().endswith(IMAGE_EXTENSIONS)]
    if len(found) != 1:
        raise GlanceError(f"{path}: {'no' if not found else len(found)} source images named {stem}.* in {folder} "
                          "(config.data.sources); one is needed")
    source = os.path.join(folder, found[0])
    try:
        with _opened(source) as image:
            image.verify()
        with _opened(source) as image:
            source_size = ImageOps.exif_transpose(image).size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise GlanceError(f"{source}: unreadable image ({e})") from None
    if source_size != size:
        raise GlanceError(f"{source}: {source_size[0]}x{source_size[1]}, its edit {path} is {size[0]}x{size[1]}; "
                          "a source image and its edit must be the same size")
    return source


@contextlib.contextmanager
def _opened(path):
    """`Image.open(path)` that refuses, in one line, an image whose header claims more than PIL's
    `Image.MAX_IMAGE_PIXELS` (a decompression bomb: PIL itself only warns up to twice that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                yield image
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise GlanceError(f"{path}: the image claims more than {Image.MAX_IMAGE_PIXELS} pixels (a decompression "
                              "bomb, or far larger than any training size); refused before decoding it") from None


def as_rgb(image):
    """An RGB image as a viewer shows it: EXIF orientation applied; 16-bit and 32-bit grey scaled to 8 bits
    (not clipped); palette, grey and CMYK converted; transparency composited over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        top = 65535.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 255.0
        grey = np.clip(np.asarray(image, np.float64) / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image) * 255.0, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")  # RGB, L, 1, CMYK, YCbCr, LAB, HSV


def read_image(path, what="--image"):
    """The RGB image at `path` (a source image to edit), refused in one line if it is missing or unreadable."""
    if not os.path.isfile(os.path.expanduser(path)):
        raise GlanceError(f"{what} {path}: no such file")
    try:
        with _opened(os.path.expanduser(path)) as image:
            image = as_rgb(image)
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as e:
        raise GlanceError(f"{what} {path}: not a readable image ({e})") from None


def load_image(sample, path=None):
    """The sample's image (or its source image at `path`) resized and centre-cropped to its training size:
    (H, W, 3) float32 in [-1, 1]."""
    with _opened(path or sample.image_path) as image:
        image = as_rgb(image)
        scale = max(sample.width, sample.height) / max(image.size)
        scale = max(scale, sample.width / image.size[0], sample.height / image.size[1])
        size = (max(sample.width, round(image.size[0] * scale)), max(sample.height, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - sample.width) // 2, (size[1] - sample.height) // 2
        image = image.crop((left, top, left + sample.width, top + sample.height))
    return np.asarray(image, np.float32) / 127.5 - 1.0


def files_digest(kind, folders):
    """A cache identity for the checkpoints in `folders`, read from their files, never from their weights: every
    file's name and size, a .safetensors file's header (tensor names, dtypes, shapes, offsets) and the bytes of
    the other files up to 64 MiB (configs, tokenizers)."""
    digest = hashlib.sha256(kind.encode())
    for folder in folders:
        for root, dirs, names in sorted(os.walk(folder)):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(root, name)
                size = os.path.getsize(path)
                digest.update(f"\0{os.path.relpath(path, folder)}\0{size}\0".encode())
                with open(path, "rb") as f:
                    if name.endswith(".safetensors"):
                        head = f.read(8)
                        digest.update(head + f.read(int.from_bytes(head, "little")) if len(head) == 8 else head)
                    elif size <= 64 * 2 ** 20:
                        digest.update(f.read())
    return f"{kind}:{digest.hexdigest()}"


SCALE_KEY = "vae_scale_factor"  # a precomputed file's metadata: pixels per latent, if not its family VAE's


def pixels_per_latent(sample, vae_path, family):
    """Pixels per latent of the sample's latents, read before anything loads: the VAE's (from its config), else
    the `vae_scale_factor` metadata of a precomputed file beside the image, else the family's VAE's."""
    if vae_path:
        config = safe_io.read_json(os.path.join(vae_path, "config.json"))
        return checkpoints.model_from_config(config, np.float32, families.CLASSES).spatial_scale
    path = os.path.splitext(sample.image_path)[0] + ".safetensors"
    declared = safetensors_io.SafetensorsFile(path).metadata.get(SCALE_KEY) if os.path.isfile(path) else None
    if declared is None:
        return family.vae_scale_factor
    if not declared.isdigit() or int(declared) < 1:
        raise GlanceError(f"{path}: its {SCALE_KEY} metadata {declared!r} is not a positive integer")
    return int(declared)


class PrecomputedEncoder:
    """Reads `name.safetensors` beside each image (see the module docstring for its arrays).

    `with_latents` / `with_text` say which parts come from the file (the others come from the Flax VAE or
    text encoders); `pooled_dim` None: the model takes no pooled text vector (Qwen-Image).
    """

    def __init__(self, latent_channels, text_dim, pooled_dim=None, vae_scale_factor=8, with_latents=True,
                 with_text=True, sources=0):
        self.with_latents, self.with_text, self.sources = with_latents, with_text, sources
        self.latent_channels, self.text_dim, self.pooled_dim = latent_channels, text_dim, pooled_dim
        self.vae_scale_factor = vae_scale_factor

    def path(self, sample):
        return os.path.splitext(sample.image_path)[0] + ".safetensors"

    def identity(self, sample):
        path = self.path(sample)
        if not os.path.isfile(path):
            wanted = " and ".join(w for w, on in (("latents", self.with_latents), ("text encodings", self.with_text))
                                  if on)
            raise GlanceError(
                f"{sample.image_path}: no encoded {wanted} ({os.path.basename(path)}): set config.model.vae_path / "
                "config.model.text_encoder_path, or write them with any tool (see glance_jax/data.py)")
        with open(path, "rb") as f:
            return "precomputed:" + hashlib.sha256(f.read()).hexdigest()

    def encode(self, sample):
        path = self.path(sample)
        f = safetensors_io.SafetensorsFile(path)
        latents = ("latents",) + tuple(source_key(i) for i in range(self.sources))  # an edit: its sources' too
        required = (latents if self.with_latents else ()) + (("prompt_embeds",) if self.with_text else ()) + (
            ("pooled_prompt_embeds",) if self.pooled_dim and self.with_text else ())
        missing = [k for k in required if k not in f.tensors]
        if missing:
            raise GlanceError(f"{path}: missing arrays {', '.join(missing)}")
        wanted = lambda k: self.with_latents if k in latents else self.with_text
        arrays = {k: f.read(k).astype(np.int32 if k.endswith("_mask") else np.float32) for k in f.keys() if wanted(k)}
        validation.finite_arrays(arrays, path)
        grid = (sample.height // self.vae_scale_factor, sample.width // self.vae_scale_factor, self.latent_channels)
        want = {key: grid for key in latents} if self.with_latents else {}
        if self.pooled_dim and self.with_text:
            want["pooled_prompt_embeds"] = (self.pooled_dim,)
        for key, shape in want.items():
            if arrays[key].shape != shape:
                raise GlanceError(f"{path}: {key} has shape {arrays[key].shape}, training at "
                                  f"{sample.width}x{sample.height} needs {shape}")
        if self.with_text and (arrays["prompt_embeds"].ndim != 2 or arrays["prompt_embeds"].shape[1] != self.text_dim):
            raise GlanceError(f"{path}: prompt_embeds has shape {arrays['prompt_embeds'].shape}, the model needs "
                              f"(tokens, {self.text_dim})")
        return arrays


class VAEEncoder:
    """The latents of the resized, cropped image from a Flax VAE (FLUX.1's or Qwen-Image's), loaded when needed."""

    def __init__(self, vae_path):
        self.path = vae_path
        self._identity = files_digest("vae", [vae_path])

    def identity(self, sample):
        return self._identity

    def encode(self, sample):
        vae, params = families.load_model(self.path)
        encode = jax.jit(functools.partial(pipelines.encode_images, vae))
        latents = lambda path: np.asarray(encode(params, load_image(sample, path)[None])[0], np.float32)
        return {"latents": latents(None), **{source_key(i): latents(p) for i, p in enumerate(sample.sources)}}


class FlaxTextEncoder:
    """The caption's (and the empty prompt's) text encodings from the Flax text encoders of a pipeline folder,
    and those of `prompts` (`config.teacher.prompts`) stacked as `teacher_prompt_embeds` (N, T, D) ...

    The encoders load in `dtype` (the base's, by default: T5-XXL in fp32 would be 19 GB beside the base) only
    when a sample is encoded, and are released right after; the cache identity comes from their files.
    """

    def __init__(self, family, path, dtype="fp32", prompts=()):
        self.family, self.path, self.dtype, self.prompts = family, path, dtype, tuple(prompts)
        safe_io.no_remote_code(path)  # before any encoder loads
        folders = [os.path.join(path, sub) for sub in sorted(os.listdir(path))
                   if sub in family.text_encoders or sub.startswith("tokenizer")]
        self._identity = files_digest(f"text:{dtype}:{json.dumps(self.prompts)}", folders)

    def identity(self, sample):
        return self._identity

    def encode(self, sample):
        loaded = self.family.prompt_encoder.from_pretrained(self.path, dtype=checkpoints.parse_dtype(self.dtype))
        encoder = loaded
        if self.family.prompt_sees_images:  # every prompt sees the edit's source images, as at sampling
            images = self.family.prompt_images([Image.fromarray(
                ((load_image(sample, p) + 1) * 127.5).round().astype(np.uint8)) for p in sample.sources])
            encoder = lambda texts: loaded(texts, images)
        out = {}
        for prefix, text in (("", sample.caption), ("empty_", " ")):  # " ": the official empty prompt
            for key, value in encoder([text]).items():
                out[prefix + key] = np.asarray(value[0], np.int32 if key.endswith("_mask") else np.float32)
        if self.prompts:  # one row per extra caption
            for key, value in encoder(list(self.prompts)).items():
                out["teacher_" + key] = np.asarray(value, np.int32 if key.endswith("_mask") else np.float32)
        del encoder, loaded  # the text encoders' memory goes back before the base trains
        return out


def with_teacher_prompts(arrays, prompts, image_path):
    """`arrays` with the extra captions' encodings (`teacher_prompt_embeds` ...) kept only when
    `config.teacher.prompts` names them, and then checked to be one per prompt."""
    extra = {k: v for k, v in arrays.items() if k.startswith("teacher_")}
    if not prompts:
        return {k: v for k, v in arrays.items() if k not in extra}
    count = len(extra["teacher_prompt_embeds"]) if "teacher_prompt_embeds" in extra else 0
    if count != len(prompts):
        raise GlanceError(f"{image_path}: config.teacher.prompts names {len(prompts)} prompts, the encoded sample "
                          f"has {count} teacher_prompt_embeds")
    return arrays


class SampleEncoder:
    """Latents from one source and text encodings from another, under one cache identity."""

    def __init__(self, latents, text):
        self.parts = [p for p in (latents, text) if p is not None]

    def identity(self, sample):
        return "|".join(p.identity(sample) for p in self.parts)

    def encode(self, sample):
        return {k: v for p in self.parts for k, v in p.encode(sample).items()}


def encoded_sample(sample, encoder, cache_dir, resolution):
    """The sample's encoded arrays, from the cache if an identical encoding was made before."""
    digest = hashlib.sha256()
    for image in (sample.image_path,) + tuple(sample.sources):
        with open(image, "rb") as f:
            digest.update(f.read())
    for part in (sample.caption, f"{sample.width}x{sample.height}@{resolution}", encoder.identity(sample)):
        digest.update(b"\0" + part.encode())
    path = os.path.join(cache_dir, digest.hexdigest() + ".safetensors")
    if os.path.isfile(path):
        arrays = _read_cache_entry(path)
        if arrays is not None:
            return arrays, True
    arrays = encoder.encode(sample)
    os.makedirs(cache_dir, exist_ok=True)
    safetensors_io.save_file(arrays, path, {"image": sample.image_path, "caption": sample.caption,
                                            "content_sha256": _arrays_digest(arrays)})
    return arrays, False


def _arrays_digest(arrays):
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _read_cache_entry(path):
    """The arrays of a cache entry, or None (with a warning) if it is damaged and must be recomputed."""
    try:
        f = safetensors_io.SafetensorsFile(path)
        arrays = {k: f.read(k) for k in f.keys()}
        stored = f.metadata.get("content_sha256")
        if stored is not None and stored != _arrays_digest(arrays):
            raise GlanceError("its content does not match its checksum")
        return arrays
    except (GlanceError, OSError, ValueError) as e:
        log.warning("cache entry %s is damaged (%s); encoding the sample again", path, e)
        return None
