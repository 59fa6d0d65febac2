"""FLUX.1 Kontext's answers to what glance_jax asks of a model family (see glance_jax/family.py).

Kontext is FLUX.1-dev's architecture, checkpoints and text encoders; what differs is the source image: VAE latents
of it, resized to the resolution Kontext was trained at nearest its aspect ratio, are packed and appended to the
image tokens with position ids (1, row, column) (`FluxTransformer2DModel.conditioning`), and the model's output is
cut back to the image's tokens. Its pipeline folder names `FluxKontextPipeline`.
"""

from glance_jax.flux.adapter import FLUX, FluxFamily

# diffusers' PREFERRED_KONTEXT_RESOLUTIONS: the (width, height) Kontext was trained at, about one megapixel each
PREFERRED_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                         (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                         (1456, 720), (1504, 688), (1568, 672))
DEFAULT_SIZE = 1024  # FluxKontextPipeline's output without height and width: 1024 x 1024 whatever the source


class FluxKontextFamily(FluxFamily):
    """FLUX.1 Kontext: one source image, resized to the preferred resolution nearest its aspect ratio."""

    def reference_size(self, height, width):
        _, w, h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_RESOLUTIONS)
        return super().reference_size(h, w)

    def output_size(self, height, width):
        return DEFAULT_SIZE, DEFAULT_SIZE


FLUX_KONTEXT = FluxKontextFamily.based_on(
    FLUX, name="flux-kontext", variants={"flux-kontext": {"guidance_embeds": True}},
    pipelines=("FluxKontextPipeline",), reference_images=1)
