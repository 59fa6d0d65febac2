"""PyTorch peers for parity tests: diffusers/peft models with random weights, saved in their real formats."""

import numpy as np
import torch


def randomize_(module, seed):
    """Gives every parameter random values (norm scales around 1) so that swapped or skipped weights show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def flux_image_ids(height, width):
    """diffusers' latent image ids for a (height, width) grid of packed tokens: (0, row, column)."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(-1, 3)


def flux_inputs(config, batch, grid, text_len, seed=0, guidance=3.5):
    """Random FLUX transformer inputs (numpy, float32) with diffusers' argument names."""
    rng = np.random.default_rng(seed)
    h, w = grid
    inputs = dict(
        hidden_states=rng.standard_normal((batch, h * w, config["in_channels"]), dtype=np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_len, config["joint_attention_dim"]), dtype=np.float32),
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"]), dtype=np.float32),
        timestep=rng.uniform(0.05, 1.0, (batch,)).astype(np.float32),
        img_ids=flux_image_ids(h, w),
        txt_ids=np.zeros((text_len, 3), np.float32),
        guidance=np.full((batch,), guidance, np.float32) if config.get("guidance_embeds") else None,
    )
    return inputs


def torch_forward(model, inputs):
    kw = {k: (torch.from_numpy(v) if v is not None else None) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**kw, return_dict=False)[0].numpy()


def relative_error(got, want):
    """max |got - want| / max |want|: the parity measure quoted in tests and notes."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))
