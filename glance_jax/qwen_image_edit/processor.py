"""Qwen2-VL image preprocessing (transformers' `Qwen2VLImageProcessor`) and the expansion of `<|image_pad|>`.

An image (PIL) becomes `pixel_values` rows for the vision tower as transformers 5.25 computes them with its PIL
backend (`Qwen2VLImageProcessorPil`, what `Qwen2VLProcessor` runs where torchvision is absent, and what the
slow processor of transformers 4 did): converted to RGB (transparency composited on white), resized with PIL's
bicubic filter to `smart_resize` (each side a multiple of patch_size * merge_size, the area within
[min_pixels, max_pixels], the aspect ratio about kept), scaled by 1/255, normalized by the CLIP mean and
standard deviation, repeated `temporal_patch_size` times, and cut into patches in the vision tower's order
(merge blocks of 2 x 2 patches consecutive; each row C x T x P x P). Transformers' torchvision backend
resizes the uint8 image with torchvision's antialiased bicubic, PIL's filter in other arithmetic: its pixels
can differ from these by one level of 255.

In the prompt, each `<|image_pad|>` becomes grid_t * grid_h * grid_w / merge_size**2 of them, the images taken
in order across the prompts (what `Qwen2VLProcessor` does before tokenizing).
"""

import dataclasses
import math
import os

import numpy as np

from glance_jax import safe_io
from glance_jax.errors import GlanceError

IMAGE_PAD = "<|image_pad|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "preprocessor_config.json"
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
TRANSFORMERS_MAX_PIXELS = 28 * 28 * 1280  # Qwen2VLImageProcessor's own default, for a config that names none


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16384):
    """(height, width) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels] (Qwen2-VL's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise GlanceError(f"image {width}x{height}: the aspect ratio must be under 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor)
                                                                              * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _rgb(image):
    """A PIL image in RGB, transparency composited onto white (transformers' `convert_to_rgb`)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class QwenVLImageProcessor:
    """The settings of a Qwen2-VL image processor; defaults are Qwen2.5-VL's (the Qwen-Image-Edit `processor/`)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = BICUBIC

    @classmethod
    def from_config(cls, config):
        """From a preprocessor_config.json dict, read as transformers 5.25 reads it (`min_pixels` / `max_pixels`
        over `size`'s shortest / longest edge; what it leaves out takes Qwen2VLImageProcessor's defaults)."""
        size = config.get("size") or {}
        kwargs = {k: config[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor",
                                         "do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "resample")
                  if config.get(k) is not None}
        kwargs.update({k: tuple(config[k]) for k in ("image_mean", "image_std") if config.get(k) is not None})
        kwargs["min_pixels"] = config.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or \
            56 * 56
        kwargs["max_pixels"] = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or \
            TRANSFORMERS_MAX_PIXELS
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder):
        """From a processor folder's preprocessor_config.json; without one, Qwen2.5-VL's settings."""
        path = os.path.join(folder, CONFIG_FILE)
        return cls.from_config(safe_io.read_json(path)) if os.path.isfile(path) else cls()

    def resized_size(self, height, width):
        """The (height, width) an image of this size is resized to."""
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def pixels(self, image):
        """One PIL image as a (C, H, W) float32 array, resized, rescaled and normalized."""
        image = _rgb(image) if self.do_convert_rgb else image
        if self.do_resize:
            height, width = self.resized_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        array = np.array(image)
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            array = array if np.issubdtype(array.dtype, np.floating) else array.astype(np.float32)
            mean, std = np.array(self.image_mean, array.dtype), np.array(self.image_std, array.dtype)
            array = ((array.T - mean) / std).T
        return np.asarray(array, np.float32)

    def patchify(self, array):
        """(C, H, W) -> ((H / P) * (W / P), C * T * P * P) rows in the vision tower's order, and (1, H / P, W / P)."""
        c, height, width = array.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        if gh * p != height or gw * p != width or gh % m or gw % m:
            raise GlanceError(f"image {width}x{height}: each side must be a multiple of {p * m} (do_resize is off)")
        patches = array.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        return patches.reshape(gh * gw, c * t * p * p), (1, gh, gw)

    def __call__(self, images):
        """(pixel_values (patches, C * T * P * P) float32, image_grid_thw: a tuple of (1, h, w) per image)."""
        rows, grids = [], []
        for image in images:
            patches, grid = self.patchify(self.pixels(image))
            rows.append(patches)
            grids.append(grid)
        return np.concatenate(rows), tuple(grids)

    def image_tokens(self, grid):
        """The number of `<|image_pad|>` tokens an image of grid (t, h, w) takes in the prompt."""
        t, h, w = grid
        return t * h * w // self.merge_size ** 2


def expand_image_pads(texts, grids, merge_size, pad=IMAGE_PAD):
    """Each `pad` of `texts` (in order, across the texts) repeated for the image of the same rank: t * h * w /
    merge_size**2 times. The number of pads must equal the number of grids (none: the texts unchanged)."""
    if not grids:
        return list(texts)
    found = sum(text.count(pad) for text in texts)
    if found != len(grids):
        raise GlanceError(f"{len(grids)} image(s) for {found} {pad} token(s) in the prompts")
    counts = iter(t * h * w // merge_size ** 2 for t, h, w in grids)
    return [text.split(pad)[0] + "".join(pad * next(counts) + piece for piece in text.split(pad)[1:])
            for text in texts]
