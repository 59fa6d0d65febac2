"""Pure-functional LoRA: adapter trees, merging, and safetensors import/export.

A LoRA tree mirrors the base parameter tree down to the targeted Dense
layers: `tree["transformer_blocks"]["attn"]["to_q"] = {"A": (L, in, r),
"B": (r, out) stacked to (L, r, out), "alpha": (L,)}`, stacked like the
blocks it adapts. Blocks a LoRA does not touch have A = B = 0 and alpha = 0.

Two ways to use one:
- unmerged, for training: `model.apply({"params": base, "lora": tree}, ...)`
  computes `x W + b + (alpha / r) (x A) B` (see `layers.Dense`);
- merged, for inference: `merge_lora(params, tree)` adds `(alpha / r) A B`
  to each kernel, in place on donated buffers, so sampling costs exactly
  what the base costs and no second copy of the base is ever held.

Module names are diffusers' (`transformer_blocks.3.attn.to_q`), found through
the same table that loads checkpoints, so import and export are lookups.
"""

import collections
import functools
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from glance_jax import safetensors_io
from glance_jax.checkpoints import weight_table
from glance_jax.errors import GlanceError
from glance_jax.models import flux_bfl
from glance_jax.quantize import refuse_merge
from glance_jax.schedules import GlanceSchedule

log = logging.getLogger(__name__)

# diffusers module-name patterns (PEFT matching: a tuple names modules or dotted suffixes; a string is a regular
# expression the whole name must match). "flux" and "qwen-image": the official Glance recipes. "flux-all" and
# "qwen-image-all": every Dense layer inside the blocks (not the embedders nor the output layer), what the teacher
# target needs to follow the base's trajectory (README, the demo).
PRESETS = {
    "flux": ("to_q", "to_k", "to_v", "to_out.0"),
    "qwen-image": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                   "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"),
    "flux-all": r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|"
                r"(ff|ff_context)\.net\.(0\.proj|2)|norm1(_context)?\.linear)|"
                r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|norm\.linear|proj_mlp|proj_out)",
    "qwen-image-all": r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|"
                      r"(img|txt)_mlp\.net\.(0\.proj|2)|(img|txt)_mod\.1)",
}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig of a saved LoRA
SCHEDULE_KEY = "glance_schedule"  # the Glance timesteps a LoRA was trained for (JSON), so the pair never separates
PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
            ".lora_A.default.weight": "A", ".lora_B.default.weight": "B", ".alpha": "alpha"}


# ---- which Dense layers exist, under which names ----

def dense_layers(params):
    """{diffusers module name: (module path in the tree, block index or None, (in, out))} for every Dense kernel."""
    layers = {}
    for name, slot in weight_table(params).items():
        if slot.path[-1] == "kernel" and len(slot.torch_shape) == 2:
            layers[name[:-len(".weight")]] = (slot.path[:-1], slot.index, slot.torch_shape[::-1])
    return layers


def matches(name, patterns):
    """PEFT's target_modules rule: a regular expression (str) matches the whole name; a list of names matches
    the module name itself or a suffix after a dot."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _patterns(targets):
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise GlanceError(f"unknown LoRA preset {targets!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[targets]
    return tuple(targets)


def _stack_size(params, path):
    kernel = flatten_dict(params)[path + ("kernel",)]
    return kernel.shape[0] if len(kernel.shape) == 3 else None


# ---- building trees ----

@functools.partial(jax.jit, static_argnums=1)
def _gaussians(key, shapes):
    """Standard normal arrays of `shapes`, one key each: one compiled program per LoRA layout, not one per shape."""
    return [jax.random.normal(k, shape, jnp.float32) for k, shape in zip(jax.random.split(key, len(shapes)), shapes)]


def init_lora(key, params, targets, rank, alpha, dtype=jnp.float32):
    """A new LoRA on every Dense layer whose diffusers name matches `targets` (a preset name or patterns).

    Initialised as PEFT's `init_lora_weights="gaussian"`: A ~ N(0, (1/r)^2), B = 0, so the adapted model
    starts equal to the base.
    """
    if isinstance(rank, bool) or not float(rank).is_integer() or rank < 1:
        raise GlanceError(f"LoRA rank {rank!r}: must be a positive integer")
    rank = int(rank)
    if not np.isfinite(alpha) or alpha <= 0:
        raise GlanceError(f"LoRA alpha {alpha!r}: must be a finite number > 0 (the scale is alpha / rank)")
    patterns = _patterns(targets)
    chosen = collections.defaultdict(set)
    for name, (path, index, _) in dense_layers(params).items():
        if matches(name, patterns):
            chosen[path].add(index)
    if not chosen:
        raise GlanceError(f"no Dense layer matches the LoRA targets {targets!r}")
    flat = flatten_dict(params)
    paths = sorted(chosen)
    shapes = tuple(flat[path + ("kernel",)].shape[:-1] + (rank,) for path in paths)
    tree = {}
    for path, a in zip(paths, _gaussians(key, shapes)):
        shape = flat[path + ("kernel",)].shape
        stack, fan_out = shape[:-2], shape[-1]
        mask = np.ones(stack, np.float32)
        if stack:
            mask[:] = 0
            mask[sorted(chosen[path])] = 1
        mask = jnp.asarray(mask)
        tree[path + ("A",)] = (a / rank * mask[..., None, None]).astype(dtype)
        tree[path + ("B",)] = jnp.zeros((*stack, rank, fan_out), dtype)
        tree[path + ("alpha",)] = (alpha * mask).astype(jnp.float32)
    return unflatten_dict(tree)


def _modules(tree):
    """{module path: {"A", "B", "alpha"}} of a LoRA tree."""
    modules = collections.defaultdict(dict)
    for path, leaf in flatten_dict(tree).items():
        modules[path[:-1]][path[-1]] = leaf
    return modules


# ---- merging ----

def check_shapes(params, tree):
    """Raises one GlanceError naming the first layer whose LoRA does not fit the model, with both shapes.

    Works on arrays and on abstract shapes (also inside a trace), so the merged and the unmerged paths
    both check before any compute.
    """
    flat = flatten_dict(params)
    modules = _modules(tree)
    missing = [".".join(p) for p in modules if p + ("kernel",) not in flat]
    if missing:
        raise GlanceError(f"LoRA modules not in the model: {', '.join(missing[:6])}")
    for path, m in modules.items():
        if not {"A", "B", "alpha"} <= set(m):
            raise GlanceError(f"LoRA layer {'.'.join(path)}: needs A, B and alpha, has {', '.join(sorted(m))}")
        kernel, a, b, alpha = flat[path + ("kernel",)].shape, m["A"].shape, m["B"].shape, m["alpha"].shape
        fits = (len(a) == len(kernel) and len(b) == len(kernel) and a[:-2] == kernel[:-2] == b[:-2]
                and a[-2] == kernel[-2] and b[-1] == kernel[-1] and a[-1] == b[-2] and tuple(alpha) == kernel[:-2])
        if not fits:
            raise GlanceError(f"LoRA layer {'.'.join(path)}: A {tuple(a)} and B {tuple(b)} (alpha {tuple(alpha)}) "
                              f"do not fit the model's kernel {tuple(kernel)}")


def _check_scale(scale):
    if isinstance(scale, (int, float, np.number)) and not np.isfinite(scale):
        raise GlanceError(f"LoRA scale {scale!r}: must be a finite number")


def merged_params(params, tree, scale=1.0):
    """params with `W + scale (alpha / r) A B` in each adapted kernel (fp32 math, W's dtype). Traceable.

    Only the adapted kernels are new arrays; every other leaf is `params`' own.
    """
    refuse_merge(params)
    check_shapes(params, tree)
    _check_scale(scale)
    flat = flatten_dict(params)
    modules = _modules(tree)
    for path, m in modules.items():
        kernel = flat[path + ("kernel",)]
        a, b = m["A"].astype(jnp.float32), m["B"].astype(jnp.float32)
        factor = scale * m["alpha"].astype(jnp.float32) / a.shape[-1]
        delta = jnp.matmul(a, b) * jnp.asarray(factor)[..., None, None]
        flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(flat)


_merge = jax.jit(merged_params)
_merge_in_place = jax.jit(merged_params, donate_argnums=0)


def merge_lora(params, tree, scale=1.0, donate=True):
    """params with `W + scale (alpha / r) A B` in every adapted kernel, computed in fp32, cast to W's dtype.

    With `donate=True` (the default) `params` is donated: the update happens
    in place and the `params` passed in must not be used again
    (`params = merge_lora(params, tree)`). Merge several LoRAs by calling it
    once for each; `merge_lora(params, tree, scale=-1.0)` (or `unmerge_lora`)
    takes one out again, to rounding.
    """
    refuse_merge(params)
    check_shapes(params, tree)  # before the buffers are donated: a bad LoRA leaves `params` intact
    _check_scale(scale)
    return (_merge_in_place if donate else _merge)(params, tree, jnp.float32(scale))


def unmerge_lora(params, tree, scale=1.0, donate=True):
    """Takes a merged LoRA back out: `merge_lora(params, tree, -scale)`."""
    return merge_lora(params, tree, -scale, donate)


# ---- reading files ----

def _lora_file(source):
    """(the .safetensors file of a LoRA file or folder, the folder's PEFT adapter_config or None)."""
    path = os.fspath(source)
    if not os.path.isdir(path):
        return path, None
    for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
        if os.path.isfile(os.path.join(path, name)):
            adapter_config, config = os.path.join(path, "adapter_config.json"), None
            if os.path.isfile(adapter_config):
                with open(adapter_config) as f:
                    config = json.load(f)
            return os.path.join(path, name), config
    raise GlanceError(f"{path}: no pytorch_lora_weights.safetensors or adapter_model.safetensors in it")


def read_schedule(path):
    """The GlanceSchedule a LoRA file was trained for (written by `save_lora(..., schedule=...)`), or None."""
    f = safetensors_io.SafetensorsFile(_lora_file(path)[0])
    if SCHEDULE_KEY not in f.metadata:
        return None
    try:
        described = json.loads(f.metadata[SCHEDULE_KEY])
    except ValueError:
        raise GlanceError(f"{f.path}: its {SCHEDULE_KEY} metadata is not JSON") from None
    return GlanceSchedule.from_dict(described)


def _read_state_dict(source):
    """(tensors as numpy, LoRA config dict or None, where) from a path or an in-memory state dict."""
    if isinstance(source, dict):
        to_np = lambda v: v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return {k: to_np(v) for k, v in source.items()}, None, "state dict"
    path, config = _lora_file(source)
    f = safetensors_io.SafetensorsFile(path)
    if config is None and METADATA_KEY in f.metadata:
        packed = json.loads(f.metadata[METADATA_KEY])
        config = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")} or packed
    return {name: f.read(name) for name in f.keys()}, config, path


def _split_key(key):
    """(module name as written, kind) for a LoRA key, or None if it is not one."""
    for suffix, kind in SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], kind
    return None


def _name_lookup(params):
    """How module names in files map to this model: {name as written: [(diffusers module, B row ranges)]}.

    Covers diffusers names and, for FLUX, BFL names (fused q|k|v and linear1
    split onto their targets), each also with dots written as underscores (kohya).
    """
    layers = dense_layers(params)
    lookup = {name: [(name, None)] for name in layers}
    hidden = None
    if "x_embedder" in params:  # FLUX: BFL names too
        depth = lambda stack: _stack_size(params, (stack, "attn", "to_q")) if stack in params else 0
        hidden = layers["x_embedder"][2][1]
        for bfl, rule, _ in flux_bfl.module_rows(depth("transformer_blocks"), depth("single_transformer_blocks")):
            first = flux_bfl.to_diffusers(bfl + ".weight", 0, hidden)[0][0][:-len(".weight")]
            if first in layers:
                lookup[bfl] = ("bfl", bfl)
    for name in list(lookup):
        lookup.setdefault(name.replace(".", "_"), lookup[name])
    return lookup, hidden


def _resolve(lookup, hidden, name, b_rows):
    """[(diffusers module, B row ranges or None)] for a module name as written in a file, or None."""
    entry = lookup.get(name)
    if entry is None:
        return None
    if isinstance(entry, tuple) and entry[0] == "bfl":
        targets = flux_bfl.to_diffusers(entry[1] + ".weight", b_rows, hidden)
        return [(t[:-len(".weight")], ranges) for t, ranges in targets]
    return entry


def _pattern_value(config, key, name, default):
    """A per-module value from a LoraConfig dict: its rank_pattern/alpha_pattern (PEFT's regex rule) or default."""
    for pattern, value in (config.get(key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def load_lora(path_or_state_dict, params, strict=True):
    """A LoRA tree for `params` from a diffusers/PEFT, kohya or ComfyUI file (or folder, or state dict).

    Alpha comes from the file's `.alpha` tensors or its LoRA config (diffusers
    metadata, PEFT adapter_config.json); without either, the scale is 1.0
    (alpha = rank), exactly as diffusers applies such files. Keys that match
    nothing in the model, unsupported LoRA variants, and shape disagreements
    raise one error listing them; with `strict=False` unmatched keys are left
    out and listed in full on the log instead.
    """
    tensors, config, where = _read_state_dict(path_or_state_dict)
    lookup, hidden = _name_lookup(params)
    layers = dense_layers(params)
    found = collections.defaultdict(dict)  # diffusers module -> {"A", "B", "alpha"}
    unknown, unsupported = [], []
    lora_keys = 0
    for key in sorted(tensors):
        if "lora_magnitude_vector" in key or ".lora_B.bias" in key or ".lora_mid." in key:
            unsupported.append(key)
            continue
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        lora_keys += 1
        module_key, kind = split
        written = module_key
        for prefix in KOHYA_PREFIXES + PREFIXES:
            if written.startswith(prefix):
                written = written[len(prefix):]
                break
        targets = _resolve(lookup, hidden, written, _b_rows(tensors, module_key))
        if targets is None:
            unknown.append(key)
            continue
        value = tensors[key]
        for module, ranges in targets:
            if kind == "B" and ranges is not None:  # this target's rows of a fused lora_up
                found[module][kind] = np.concatenate([value[start:stop] for start, stop in ranges], axis=0)
            else:
                found[module][kind] = value
    if lora_keys == 0:
        raise GlanceError(f"{where}: not a LoRA file (no lora_A/lora_B or lora_down/lora_up keys)")
    if unsupported:
        raise GlanceError(f"{where}: unsupported LoRA variant keys (DoRA, LoRA bias or LoCon): "
                          f"{', '.join(unsupported[:6])}")
    if unknown:
        message = f"{where}: {len(unknown)} keys match nothing in this model: {', '.join(unknown)}"
        if strict:
            raise GlanceError(message if len(unknown) <= 8 else
                              f"{where}: {len(unknown)} keys match nothing in this model: "
                              f"{', '.join(unknown[:8])}, ... (strict=False loads the rest and lists them all)")
        log.warning("left out of the LoRA: %s", message)
    return _build_tree(found, layers, params, config, where)


def _b_rows(tensors, module_key):
    """Rows (output features) of the lora_B / lora_up tensor stored for `module_key`."""
    for suffix in (".lora_B.weight", ".lora_up.weight", ".lora_B.default.weight"):
        if module_key + suffix in tensors:
            return tensors[module_key + suffix].shape[0]
    return 0


def _build_tree(found, layers, params, config, where):
    problems, modules = [], {}
    for module, parts in sorted(found.items()):
        if "A" not in parts or "B" not in parts:
            problems.append(f"{module} has {' and '.join(sorted(parts))} only")
            continue
        down, up = parts["A"], parts["B"]
        fan_in, fan_out = layers[module][2]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            problems.append(f"{module}: lora_A {down.shape} and lora_B {up.shape} have different ranks")
        elif down.shape[1] != fan_in or up.shape[0] != fan_out:
            problems.append(f"{module}: LoRA maps {down.shape[1]} -> {up.shape[0]}, the layer {fan_in} -> {fan_out}")
        else:
            modules[module] = (down, up, parts.get("alpha"))
    if problems:
        raise GlanceError(f"{where}: shape mismatch: " + "; ".join(problems[:4]))

    alpha_source = "from the file's .alpha tensors"
    flat = {}
    by_path = collections.defaultdict(dict)
    for module, (down, up, alpha) in modules.items():
        rank = down.shape[0]
        if alpha is None:
            if config is not None and ("lora_alpha" in config or "alpha_pattern" in config):
                alpha = _pattern_value(config, "alpha_pattern", module, config.get("lora_alpha", rank))
                if config.get("use_rslora"):
                    alpha = alpha * np.sqrt(rank)
                alpha_source = "from the file's LoRA config"
            else:
                alpha = rank
                alpha_source = "none in the file: alpha = rank, scale 1.0, as diffusers applies it"
        path, index, _ = layers[module]
        alpha = np.asarray(alpha, np.float32).reshape(-1)  # kohya writes a scalar, some tools shape (1,)
        if alpha.size != 1:
            raise GlanceError(f"{where}: alpha of {module} has shape {alpha.shape}, not a single number")
        by_path[path][index] = (down.T.astype(np.float32), up.T.astype(np.float32), float(alpha[0]))
    for path, entries in by_path.items():
        rank = max(a.shape[1] for a, _, _ in entries.values())
        stack = _stack_size(params, path)
        fan_in, fan_out = next(iter(entries.values()))[0].shape[0], next(iter(entries.values()))[1].shape[1]
        shape = (stack,) if stack is not None else ()
        a_all, b_all = np.zeros((*shape, fan_in, rank), np.float32), np.zeros((*shape, rank, fan_out), np.float32)
        alpha_all = np.zeros(shape, np.float32)
        for index, (a, b, alpha) in entries.items():
            r = a.shape[1]
            at = (index,) if index is not None else ()
            a_all[at][..., :r] = a
            b_all[at][..., :r, :] = b
            alpha_all[at] = alpha * rank / r  # zero-padded to a common rank: keep alpha / r unchanged
        flat[path + ("A",)], flat[path + ("B",)], flat[path + ("alpha",)] = a_all, b_all, alpha_all
    tree = jax.tree_util.tree_map(jnp.asarray, unflatten_dict(flat))
    # Saying which scale was applied matters most when the file had no alpha: warn then.
    report = log.warning if alpha_source.startswith("none") else log.info
    report("loaded LoRA from %s: %s (alpha: %s)", where, describe(tree), alpha_source)
    return tree


def describe(tree):
    """One line: how many layers a LoRA adapts, its ranks and its scales alpha / r."""
    ranks, scales, layers = set(), set(), 0
    for m in _modules(tree).values():
        alpha = np.atleast_1d(np.asarray(m["alpha"]))
        live = alpha != 0
        layers += int(live.sum())
        ranks.add(m["A"].shape[-1])
        scales.update(np.round(alpha[live] / m["A"].shape[-1], 4).tolist())
    return (f"{layers} layers, rank {'/'.join(map(str, sorted(ranks)))}, "
            f"scale alpha/r = {'/'.join(f'{s:g}' for s in sorted(scales))}")


# ---- writing files ----

def _entries(tree):
    """[(diffusers module, A (in, r), B (r, out), alpha)] for every adapted layer (alpha != 0) of a tree."""
    out = []
    for path, m in sorted(_modules(tree).items()):
        a, b, alpha = (np.asarray(m[k], np.float32) for k in ("A", "B", "alpha"))
        if a.ndim == 2:
            out.append((".".join(path), a, b, float(alpha)))
            continue
        for i in range(a.shape[0]):
            if alpha[i] != 0:
                out.append((".".join((path[0], str(i), *path[1:])), a[i], b[i], float(alpha[i])))
    return out


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def save_lora(tree, path, format="diffusers", model_type=None, schedule=None):
    """Writes a LoRA tree as .safetensors that diffusers, PEFT, ComfyUI and kohya-style tools load.

    `schedule` (a GlanceSchedule) goes into the file's metadata under `glance_schedule`, where
    `read_schedule` and the `sample` / `eval` commands find it; other tools ignore it.

    - "diffusers": `transformer.<module>.lora_A.weight` (r, in) and `lora_B.weight` (out, r), with the
      LoraConfig (r, lora_alpha, target_modules, rank/alpha patterns) in the `lora_adapter_metadata`
      entry of the file's metadata, so diffusers applies exactly the scale alpha / r used here.
    - "kohya": `lora_unet_<module>.lora_down.weight` / `lora_up.weight` / `.alpha`. FLUX modules use
      BFL names (q, k, v LoRAs fused into one `qkv` / `linear1` LoRA of rank 3r with a block-diagonal
      up matrix, exact); Qwen-Image uses diffusers names with underscores. `model_type` ("flux" or
      "qwen-image") is read off the tree's layers when they tell, and must be given when they do not.
    The file is written whole or not at all.
    """
    entries = _entries(tree)
    if not entries:
        raise GlanceError("the LoRA tree adapts no layer")
    if format == "diffusers":
        tensors = {}
        for name, a, b, _ in entries:
            tensors[f"transformer.{name}.lora_A.weight"] = a.T
            tensors[f"transformer.{name}.lora_B.weight"] = b.T
        ranks = {name: a.shape[1] for name, a, _, _ in entries}
        alphas = {name: alpha for name, _, _, alpha in entries}
        r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
        config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
                  "rank_pattern": {n: v for n, v in ranks.items() if v != r},
                  "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha}}
        metadata = {"format": "pt",
                    METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)}
    elif format == "kohya":
        model_type = model_type or _model_type(tree)
        if model_type == "flux":
            tensors = _kohya_tensors(tree, entries)
        else:
            tensors = {}
            for name, a, b, alpha in entries:
                stem = "lora_unet_" + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = a.T, b.T
                tensors[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
        metadata = {"format": "pt"}
    else:
        raise GlanceError(f"unknown LoRA format {format!r}: use 'diffusers' or 'kohya'")
    if schedule is not None:
        metadata[SCHEDULE_KEY] = json.dumps(schedule.to_dict())
    safetensors_io.save_file(tensors, path, metadata)


def _model_type(tree):
    """"flux" or "qwen-image" from a LoRA tree's layers, when they tell."""
    names = {path[1] for path in _modules(tree) if len(path) > 1}
    if "single_transformer_blocks" in tree:
        return "flux"
    if names & {"img_mod.1", "txt_mod.1", "img_mlp", "txt_mlp"}:
        return "qwen-image"
    raise GlanceError("cannot tell FLUX from Qwen-Image by this LoRA's layers: pass model_type")


def _kohya_tensors(tree, entries):
    """FLUX LoRA entries under kohya / sd-scripts names (BFL modules), fused where BFL fuses the layers."""
    by_name = {name: (a, b, alpha) for name, a, b, alpha in entries}
    depth = lambda stack: next(iter(_modules(tree[stack]).values()))["A"].shape[0] if stack in tree else 0
    tensors, used = {}, set()
    for bfl, rule, targets in flux_bfl.module_rows(depth("transformer_blocks"), depth("single_transformer_blocks")):
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
        key = "lora_unet_" + bfl.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    left = sorted(set(by_name) - used)
    if left:
        raise GlanceError(f"no kohya (BFL) name for LoRA modules: {', '.join(left[:6])}; use format='diffusers'")
    if any(key.startswith("lora_unet_final_layer") for key in tensors):
        log.warning("the kohya file has final_layer LoRAs, which diffusers' kohya reader (0.42) does not apply as "
                    "written (unprefixed keys, alpha ignored); use format='diffusers' for diffusers")
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
