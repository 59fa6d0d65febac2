"""Black Forest Labs' original FLUX.1 checkpoint layout, as a table onto diffusers' module names.

Each row maps one BFL module to the diffusers module(s) that hold its rows:
`copy` (one to one), `split` (consecutive row blocks: fused q|k|v, or
q|k|v|mlp in `linear1`, whose sizes come from the hidden width), and `swap`
(the final modulation is stored shift|scale in BFL and scale|shift in
diffusers). Both `.weight` and `.bias` (or a norm's `.scale`) follow the row.
"""

import re

import numpy as np

# (BFL module, rule, diffusers module(s)); "{i}" is the block index.
BFL_MODULES = [
    ("img_in", "copy", "x_embedder"),
    ("txt_in", "copy", "context_embedder"),
    ("time_in.in_layer", "copy", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "copy", "time_text_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "copy", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "copy", "time_text_embed.guidance_embedder.linear_2"),
    ("vector_in.in_layer", "copy", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "copy", "time_text_embed.text_embedder.linear_2"),
    ("double_blocks.{i}.img_mod.lin", "copy", "transformer_blocks.{i}.norm1.linear"),
    ("double_blocks.{i}.txt_mod.lin", "copy", "transformer_blocks.{i}.norm1_context.linear"),
    ("double_blocks.{i}.img_attn.qkv", "split",
     ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v")),
    ("double_blocks.{i}.txt_attn.qkv", "split",
     ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
      "transformer_blocks.{i}.attn.add_v_proj")),
    ("double_blocks.{i}.img_attn.norm.query_norm", "copy", "transformer_blocks.{i}.attn.norm_q"),
    ("double_blocks.{i}.img_attn.norm.key_norm", "copy", "transformer_blocks.{i}.attn.norm_k"),
    ("double_blocks.{i}.txt_attn.norm.query_norm", "copy", "transformer_blocks.{i}.attn.norm_added_q"),
    ("double_blocks.{i}.txt_attn.norm.key_norm", "copy", "transformer_blocks.{i}.attn.norm_added_k"),
    ("double_blocks.{i}.img_attn.proj", "copy", "transformer_blocks.{i}.attn.to_out.0"),
    ("double_blocks.{i}.txt_attn.proj", "copy", "transformer_blocks.{i}.attn.to_add_out"),
    ("double_blocks.{i}.img_mlp.0", "copy", "transformer_blocks.{i}.ff.net.0.proj"),
    ("double_blocks.{i}.img_mlp.2", "copy", "transformer_blocks.{i}.ff.net.2"),
    ("double_blocks.{i}.txt_mlp.0", "copy", "transformer_blocks.{i}.ff_context.net.0.proj"),
    ("double_blocks.{i}.txt_mlp.2", "copy", "transformer_blocks.{i}.ff_context.net.2"),
    ("single_blocks.{i}.modulation.lin", "copy", "single_transformer_blocks.{i}.norm.linear"),
    ("single_blocks.{i}.linear1", "split",
     ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
      "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp")),
    ("single_blocks.{i}.norm.query_norm", "copy", "single_transformer_blocks.{i}.attn.norm_q"),
    ("single_blocks.{i}.norm.key_norm", "copy", "single_transformer_blocks.{i}.attn.norm_k"),
    ("single_blocks.{i}.linear2", "copy", "single_transformer_blocks.{i}.proj_out"),
    ("final_layer.linear", "copy", "proj_out"),
    ("final_layer.adaLN_modulation.1", "swap", "norm_out.linear"),
]
NAME = "BFL"
DESCRIPTION = "a Black Forest Labs FLUX checkpoint (no double_blocks.* / single_blocks.* keys)"
PARAM_NAMES = {"weight": "weight", "bias": "bias", "scale": "weight"}  # BFL leaf -> diffusers leaf
PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _pattern(template):
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias|scale)$")


_ROWS = [(_pattern(bfl), rule, targets) for bfl, rule, targets in BFL_MODULES]


def strip_prefix(name):
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def recognises(names):
    """Whether tensor names are in this layout (the loader's question to a single file)."""
    return any(strip_prefix(n).startswith(("double_blocks.", "single_blocks.")) for n in names)


def to_diffusers(name, rows, hidden):
    """Maps one BFL tensor (with `rows` rows) to [(diffusers name, [(row start, row stop), ...]), ...].

    Returns None for names that are not in the table.
    """
    name = strip_prefix(name)
    for pattern, rule, targets in _ROWS:
        m = pattern.match(name)
        if not m:
            continue
        *index, leaf = m.groups()
        fill = lambda t: t.replace("{i}", index[0]) if index else t
        suffix = "." + PARAM_NAMES[leaf]
        if rule == "copy":
            return [(fill(targets) + suffix, [(0, rows)])]
        if rule == "swap":
            half = rows // 2
            return [(fill(targets) + suffix, [(half, rows), (0, half)])]
        # split: q, k, v take `hidden` rows each; an mlp part (linear1) takes the rest.
        starts = [k * hidden for k in range(len(targets))] + [rows]
        return [(fill(t) + suffix, [(starts[k], starts[k + 1])]) for k, t in enumerate(targets)]
    return None


def config_from_shapes(shapes, axes_dims_rope=None):
    """A diffusers config dict read off the tensor shapes of a BFL checkpoint ({stripped name: shape})."""
    count = lambda prefix: len({n.split(".")[1] for n in shapes if n.startswith(prefix)})
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0] if count("double_blocks.") else \
        shapes["single_blocks.0.norm.query_norm.scale"][0]
    if axes_dims_rope is None:
        if head_dim != 128:
            raise ValueError(f"head dim {head_dim} is not FLUX.1's 128: pass axes_dims_rope")
        axes_dims_rope = (16, 56, 56)
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0],
        "num_layers": count("double_blocks."),
        "num_single_layers": count("single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": list(axes_dims_rope),
    }


def module_rows(num_double, num_single):
    """[(BFL module, rule, diffusers module(s))] with block indices filled in, for a model of this depth."""
    rows = []
    for bfl, rule, targets in BFL_MODULES:
        count = num_double if bfl.startswith("double_blocks") else num_single if bfl.startswith("single_") else 1
        for i in range(count):
            fill = lambda t: t.replace("{i}", str(i))
            rows.append((fill(bfl), rule, tuple(map(fill, targets)) if isinstance(targets, tuple) else fill(targets)))
    return rows


def from_diffusers(state, num_double, num_single):
    """A diffusers FLUX state dict ({name: array}) in BFL's layout: the table read the other way round."""
    out = {}
    for bfl, rule, targets in module_rows(num_double, num_single):
        parts = targets if isinstance(targets, tuple) else (targets,)
        for leaf, torch_leaf in PARAM_NAMES.items():
            names = [f"{t}.{torch_leaf}" for t in parts]
            if not all(n in state for n in names) or (leaf == "scale") != ("norm" in bfl):
                continue
            value = np.concatenate([state[n] for n in names], axis=0)
            if rule == "swap":
                half = len(value) // 2
                value = np.concatenate([value[half:], value[:half]], axis=0)
            out[f"{bfl}.{leaf}"] = value
    return out
