"""Qwen-Image-Edit (and 2509 Plus): Qwen-Image's transformer with reference latents, prompts that see the image."""
