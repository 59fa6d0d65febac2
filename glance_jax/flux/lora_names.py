"""FLUX.1 modules under Black Forest Labs' names in LoRA files (kohya / sd-scripts, ComfyUI), and where a trained
guidance embedding attaches: what `glance_jax.lora_formats` asks of a family's LoRA file names.

BFL fuses q|k|v (and q|k|v|mlp in `linear1`) into one layer; its LoRA
splits onto diffusers' modules by rows of lora_up (`bfl.to_diffusers`), and
an export fuses the parts' LoRAs into one exact LoRA of rank sum(r).
"""

import dataclasses

import numpy as np

from glance_jax.errors import GlanceError
from glance_jax.flux import bfl
from glance_jax.lora_tree import modules_of

PREFIXES = bfl.PREFIXES
# A trained guidance embedding (train: config.student.guidance_input) joins FLUX.1's conditioning embedding,
# beside FLUX.1-dev's own guidance_embedder, in the shape of the latter
GUIDANCE_EMBEDDER_AT = ("time_text_embed",)


@dataclasses.dataclass(frozen=True)
class FusedModule:
    """A BFL module whose LoRA goes to one or more diffusers modules (fused rows split by the hidden width)."""

    bfl: str
    hidden: int

    def targets(self, b_rows):
        """[(diffusers module, B row ranges or None)] this name's LoRA goes to."""
        return [(t[:-len(".weight")], ranges) for t, ranges in bfl.to_diffusers(self.bfl + ".weight", b_rows,
                                                                                self.hidden)]


def _first_target(name):
    """The (first) diffusers module a BFL module's rows go to."""
    return bfl.to_diffusers(name + ".weight", 0, 0)[0][0][:-len(".weight")]


def file_modules(params, layers):
    """{BFL module name: FusedModule} for a model with FLUX.1's layout (every Dense layer the BFL table maps onto
    outside the blocks, but for FLUX.1-dev's guidance embedder); {} for any other model: BFL names mean
    nothing there. `layers`: lora_formats.dense_layers(params)."""
    outside = [name for name, _, _ in bfl.BFL_MODULES if "{i}" not in name and not name.startswith("guidance_in")]
    if not all(_first_target(name) in layers for name in outside):
        return {}
    depth = lambda stack: params[stack]["attn"]["to_q"]["kernel"].shape[0] if stack in params else 0
    hidden = layers["x_embedder"][2][1]
    rows = bfl.module_rows(depth("transformer_blocks"), depth("single_transformer_blocks"))
    return {name: FusedModule(name, hidden) for name, _, _ in rows if _first_target(name) in layers}


def guidance_embedder_at(params):
    """(where in a LoRA tree a trained guidance embedding goes, its width): beside the timestep embedder."""
    return GUIDANCE_EMBEDDER_AT, params["time_text_embed"]["timestep_embedder"]["linear_2"]["kernel"].shape[-1]


def kohya_tensors(tree, entries):
    """LoRA entries [(diffusers module, A, B, alpha)] under kohya / sd-scripts names (BFL modules), fused where
    BFL fuses the layers."""
    by_name = {name: (a, b, alpha) for name, a, b, alpha in entries}
    depth = lambda stack: next(iter(modules_of(tree[stack]).values()))["A"].shape[0] if stack in tree else 0
    tensors, used = {}, set()
    for name, rule, targets in bfl.module_rows(depth("transformer_blocks"), depth("single_transformer_blocks")):
        parts = targets if isinstance(targets, tuple) else (targets,)
        present = [t for t in parts if t in by_name]
        if not present:
            continue
        used.update(present)
        if rule == "split":
            down, up, alpha = _fuse(parts, by_name)
        else:
            a, b, alpha = by_name[parts[0]]
            down, up = a.T, b.T
            if rule == "swap":  # BFL stores the final modulation as shift | scale, diffusers as scale | shift
                up = np.concatenate([up[len(up) // 2:], up[:len(up) // 2]], axis=0)
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    left = sorted(set(by_name) - used)
    if left:
        raise GlanceError(f"no kohya (BFL) name for LoRA modules: {', '.join(left[:6])}; use format='diffusers'")
    return tensors


def _fuse(parts, by_name):
    """One LoRA for a fused BFL layer (q|k|v or q|k|v|mlp) from the LoRAs of its parts, exactly.

    down stacks the parts' A; up is block-diagonal with each part's scale alpha / r folded in, so the
    fused LoRA has rank sum(r) and alpha = rank (scale 1). Parts without a LoRA get zero rows.
    """
    hidden = next(by_name[t][1].shape[1] // (4 if k == 3 else 1) for k, t in enumerate(parts) if t in by_name)
    rows = [hidden, hidden, hidden, 4 * hidden][:len(parts)]  # FLUX's mlp_ratio is 4
    present = [t for t in parts if t in by_name]
    rank = sum(by_name[t][0].shape[1] for t in present)
    down = np.concatenate([by_name[t][0].T for t in present], axis=0)
    up = np.zeros((sum(rows), rank), np.float32)
    col = 0
    for k, t in enumerate(parts):
        if t in by_name:
            a, b, alpha = by_name[t]
            r = a.shape[1]
            up[sum(rows[:k]):sum(rows[:k + 1]), col:col + r] = b.T * (alpha / r)
            col += r
    return down, up, rank
