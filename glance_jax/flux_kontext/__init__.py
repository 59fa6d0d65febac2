"""FLUX.1 Kontext: FLUX.1's transformer, VAE and text encoders, editing a source image whose latent tokens follow the image's."""
