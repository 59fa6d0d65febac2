"""The building blocks every family's Flax models share: layers, attention kernels, tiled decoding, the
`PretrainedModel` mixin (diffusers configs, `from_pretrained`) and the text encoders' common parts."""
