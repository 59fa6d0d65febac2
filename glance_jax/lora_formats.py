"""LoRA files: diffusers / PEFT, kohya and ComfyUI import, diffusers and kohya export.

Module names in files are diffusers' (`transformer_blocks.3.attn.to_q`), found
through the same table that loads checkpoints (`checkpoints.weight_table`),
so import and export are lookups. A family may also name its modules as
other tools do (FLUX.1: Black Forest Labs' `double_blocks.3.img_attn.qkv`,
fused layers split onto diffusers'); the caller passes those tables (a
family's `lora_file_names`, see glance_jax/flux/lora_names.py), and what
each real consumer drops (a family's `consumer_gaps`). The trees these
functions read and write are described in `glance_jax.lora_tree`;
`glance_jax.lora` is the API, which gives them the families' tables.
"""

import collections
import dataclasses
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from glance_jax import validation
from glance_jax.checkpoints import safetensors_io, weight_table
from glance_jax.errors import GlanceError
from glance_jax.lora_tree import GUIDANCE_EMBEDDER, guidance_embedder, modules_of, with_guidance_embedder
from glance_jax.schedules import GlanceSchedule

log = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig of a saved LoRA
FOLDED_KEY = "glance_lora_alpha"  # {module: trained alpha} of a diffusers export whose lora_B holds alpha / r
SCHEDULE_KEY = "glance_schedule"  # the Glance timesteps a LoRA was trained for (JSON), so the pair never separates
GUIDANCE_KEY = "glance_guidance"  # how the pair samples (JSON): true_cfg_scale, negative_prompt, passes_per_step
EMBEDDER_PREFIX = GUIDANCE_EMBEDDER + "."
PREFIXES = ("transformer.", "base_model.model.")  # diffusers, PEFT (then a family's own, such as ComfyUI's)
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


def stack_size(params, path):
    """Blocks in the stack a Dense layer at `path` belongs to, or None for a layer outside the stacks."""
    kernel = flatten_dict(params)[path + ("kernel",)]
    return kernel.shape[0] if len(kernel.shape) == 3 else None


def _embedder_tensors(embedder):
    """A guidance embedder as file tensors: EMBEDDER_PREFIX + FLUX.1-dev's names, torch layout (out, in)."""
    return {f"{EMBEDDER_PREFIX}{layer}.{name}": np.asarray(embedder[layer][leaf], np.float32).T
            for layer in ("linear_1", "linear_2") for leaf, name in (("kernel", "weight"), ("bias", "bias"))}


def _with_embedder_of(tree, tensors, params, layers, names, where):
    """`tree` plus the guidance embedder stored in a file's tensors (EMBEDDER_PREFIX keys), checked against the
    model, where the model's family puts one (`layers`: dense_layers(params))."""
    at = next((table.guidance_embedder_at(params) for table in names if table.file_modules(params, layers)), None)
    if at is None:
        raise GlanceError(f"{where}: it holds a trained guidance embedder, which this model does not take")
    at, dim = at
    want = {"linear_1.weight": (dim, 256), "linear_1.bias": (dim,), "linear_2.weight": (dim, dim),
            "linear_2.bias": (dim,)}
    got = {k[len(EMBEDDER_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMBEDDER_PREFIX)}
    if set(got) != set(want) or any(tuple(got[k].shape) != shape for k, shape in want.items()):
        raise GlanceError(f"{where}: its guidance embedder holds {sorted((k, tuple(v.shape)) for k, v in got.items())}"
                          f"; this model needs {sorted(want.items())}")
    embedder = {layer: {"kernel": jnp.asarray(np.asarray(got[f"{layer}.weight"], np.float32).T),
                        "bias": jnp.asarray(np.asarray(got[f"{layer}.bias"], np.float32))}
                for layer in ("linear_1", "linear_2")}
    return with_guidance_embedder(tree, at, embedder)


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
                config = validation.lora_config(_json_of(adapter_config), adapter_config)
            return os.path.join(path, name), config
    pickles = sorted(n for n in os.listdir(path) if n.endswith(safetensors_io.PICKLE_SUFFIXES))
    raise GlanceError(f"{path}: no pytorch_lora_weights.safetensors or adapter_model.safetensors in it" + (
        f" ({', '.join(pickles[:3])}: pickles, which can run any code when loaded, are never read)" if pickles else ""))


def _glance_metadata(path, key):
    """(the LoRA file's path, the JSON its metadata holds under `key`, or None where it holds none); one line if
    that entry is not JSON."""
    f = safetensors_io.SafetensorsFile(_lora_file(path)[0])
    if key not in f.metadata:
        return f.path, None
    return f.path, _json_of(f.metadata[key], f"{f.path}: its {key} metadata")


def read_schedule(path):
    """The GlanceSchedule a LoRA file was trained for (written by `save_lora(..., schedule=...)`), or None."""
    _, described = _glance_metadata(path, SCHEDULE_KEY)
    return None if described is None else GlanceSchedule.from_dict(described)


def read_guidance(path):
    """The guidance regime a LoRA file was trained for (written by `save_lora(..., guidance=...)`): {"true_cfg_scale":
    float, "negative_prompt": str or None, "passes_per_step": 1 or 2}; None if the file does not say."""
    where, regime = _glance_metadata(path, GUIDANCE_KEY)
    if regime is None:
        return None
    ok = (isinstance(regime, dict) and _finite_number(regime.get("true_cfg_scale"))
          and regime["true_cfg_scale"] > 0 and regime.get("passes_per_step") in (1, 2)
          and (regime.get("negative_prompt") is None or isinstance(regime["negative_prompt"], str)))
    if not ok or (regime["passes_per_step"] == 2) != (regime["true_cfg_scale"] > 1):
        raise GlanceError(f"{where}: its {GUIDANCE_KEY} metadata is not a guidance regime "
                          "(true_cfg_scale, negative_prompt, passes_per_step)")
    out = {"true_cfg_scale": float(regime["true_cfg_scale"]), "negative_prompt": regime.get("negative_prompt"),
           "passes_per_step": regime["passes_per_step"]}
    trained_input = regime.get("guidance_input")
    if trained_input is not None:
        scales = trained_input.get("range") if isinstance(trained_input, dict) else None
        default = trained_input.get("default") if isinstance(trained_input, dict) else None
        if (not isinstance(scales, list) or len(scales) != 2 or not all(_finite_number(x) for x in scales + [default])
                or not scales[0] <= default <= scales[1]):
            raise GlanceError(f"{where}: its {GUIDANCE_KEY} metadata has no valid guidance_input "
                              "({'range': [low, high], 'default': scale})")
        out["guidance_input"] = {"range": [float(x) for x in scales], "default": float(default)}
    return out


def _finite_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _read_state_dict(source):
    """(tensors as numpy, LoRA config dict or None, where) from a path or an in-memory state dict."""
    if isinstance(source, dict):
        to_np = lambda v: v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return {k: to_np(v) for k, v in source.items()}, None, "state dict"
    path, config = _lora_file(source)
    f = safetensors_io.SafetensorsFile(path)
    if config is None and METADATA_KEY in f.metadata:
        packed = validation.lora_config(_json_of(f.metadata[METADATA_KEY], f"{path}: its {METADATA_KEY} metadata"),
                                        path)
        config = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")} or packed
        config = validation.lora_config(config, path)
    if config is not None and FOLDED_KEY in f.metadata:
        config = dict(config, **{FOLDED_KEY: _folded_alphas(f.metadata[FOLDED_KEY], path)})
    return {name: f.read(name) for name in f.keys()}, config, path


def _folded_alphas(text, where):
    """{module: trained alpha} from a file's `glance_lora_alpha` metadata, refused in one line if malformed."""
    try:
        alphas = json.loads(text)
    except ValueError:
        alphas = None
    if not isinstance(alphas, dict) or not all(type(v) in (int, float) and v > 0 for v in alphas.values()):
        raise GlanceError(f"{where}: its {FOLDED_KEY} metadata is not a JSON object of positive alphas")
    return alphas


def _json_of(path_or_text, what=None):
    """JSON from a file (`what` None) or from text (`what` names it): one GlanceError if it is not JSON."""
    try:
        if what is None:
            with open(path_or_text, encoding="utf-8") as f:
                return json.load(f)
        return json.loads(path_or_text)
    except (OSError, ValueError) as e:
        raise GlanceError(f"{what or path_or_text}: not JSON ({e})") from None


def _split_key(key):
    """(module name as written, kind) for a LoRA key, or None if it is not one."""
    for suffix, kind in SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], kind
    return None


@dataclasses.dataclass(frozen=True)
class FileModule:
    """A module name in a LoRA file that is a diffusers module of this model (a family's table may add names
    whose LoRA goes to several modules: the same `targets` answer)."""

    diffusers: str

    def targets(self, b_rows):
        """[(diffusers module, B row ranges or None)] this name's LoRA goes to."""
        return [(self.diffusers, None)]


def _name_lookup(params, layers, names):
    """How module names in files map to this model: {name as written: FileModule or a family's own}.

    Covers diffusers names and the names of the tables in `names` that apply to this model, each also with
    dots written as underscores (kohya)."""
    lookup = {name: FileModule(name) for name in layers}
    for table in names:
        lookup.update(table.file_modules(params, layers))
    for name in list(lookup):
        lookup.setdefault(name.replace(".", "_"), lookup[name])
    return lookup


def _pattern_value(config, key, name, default):
    """A per-module value from a LoraConfig dict: its rank_pattern/alpha_pattern (module names) or default."""
    return validation.pattern_value(config, key, name, default)


def load_lora(path_or_state_dict, params, strict=True, names=()):
    """A LoRA tree for `params` from a diffusers/PEFT, kohya or ComfyUI file (or folder, or state dict).

    `names`: the LoRA file-name tables of the model families (`Family.lora_file_names`); those that apply
    to this model name its modules too.

    Alpha comes from the file's `.alpha` tensors or its LoRA config (diffusers
    metadata, PEFT adapter_config.json); without either, the scale is 1.0
    (alpha = rank), exactly as diffusers applies such files. Keys that match
    nothing in the model, unsupported LoRA variants, and shape disagreements
    raise one error listing them; with `strict=False` unmatched keys are left
    out and listed in full on the log instead.
    """
    tensors, config, where = _read_state_dict(path_or_state_dict)
    validation.finite_arrays(tensors, where)  # a NaN LoRA would sample black images, or poison a merged base
    layers = dense_layers(params)
    lookup = _name_lookup(params, layers, names)
    prefixes = KOHYA_PREFIXES + PREFIXES + tuple(p for table in names for p in table.PREFIXES)
    found = collections.defaultdict(dict)  # diffusers module -> {"A", "B", "alpha"}
    unknown, unsupported = [], []
    lora_keys = 0
    for key in sorted(tensors):
        if key.startswith(EMBEDDER_PREFIX):
            continue  # the guidance embedder, read below
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
        for prefix in prefixes:
            if written.startswith(prefix):
                written = written[len(prefix):]
                break
        if written not in lookup:
            unknown.append(key)
            continue
        value = tensors[key]
        for module, ranges in lookup[written].targets(_b_rows(tensors, module_key)):
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
    tree = _build_tree(found, layers, params, config, where)
    if any(k.startswith(EMBEDDER_PREFIX) for k in tensors):
        tree = _with_embedder_of(tree, tensors, params, layers, names, where)
    return tree


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
        trained = (config or {}).get(FOLDED_KEY, {}).get(module)
        if trained:  # a diffusers export made here: its lora_B holds the scale, undone to the trained tree
            up, alpha = up * np.float32(float(alpha) / trained), trained
        path, index, _ = layers[module]
        alpha = np.asarray(alpha, np.float32).reshape(-1)  # kohya writes a scalar, some tools shape (1,)
        if alpha.size != 1:
            raise GlanceError(f"{where}: alpha of {module} has shape {alpha.shape}, not a single number")
        by_path[path][index] = (down.T.astype(np.float32), up.T.astype(np.float32), float(alpha[0]))
    for path, entries in by_path.items():
        rank = max(a.shape[1] for a, _, _ in entries.values())
        stack = stack_size(params, path)
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
    for m in modules_of(tree).values():
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
    for path, m in sorted(modules_of(tree).items()):
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


def save_lora(tree, path, format="diffusers", family=None, schedule=None, guidance=None):
    """Writes a LoRA tree as .safetensors that diffusers, PEFT, ComfyUI and kohya-style tools load.

    `schedule` (a GlanceSchedule) goes into the file's metadata under `glance_schedule`, and `guidance` (the
    regime `read_guidance` returns) under `glance_guidance`, where the `sample` / `eval` commands find them;
    other tools ignore them.

    - "diffusers": `transformer.<module>.lora_A.weight` (r, in) and `lora_B.weight` (out, r) with the
      scale alpha / r folded into lora_B and lora_alpha = r in the LoraConfig (`lora_adapter_metadata`),
      so diffusers, ComfyUI and InvokeAI (which ignore that entry) all apply the scale used here.
    - "kohya": `lora_unet_<module>.lora_down.weight` / `lora_up.weight` / `.alpha`, under the names of the
      `family`'s LoRA file-name table where it has one (FLUX.1: BFL names, q, k, v LoRAs fused into one
      `qkv` / `linear1` LoRA of rank 3r with a block-diagonal up matrix, exact), else diffusers names with
      underscores (Qwen-Image). The `family` (a `glance_jax.family.Family`) is needed for this format.
    With a `family`, layers that real consumers drop or refuse are named in one warning.
    The file is written whole or not at all.
    """
    entries = _entries(tree)
    if not entries:
        raise GlanceError("the LoRA tree adapts no layer")
    validation.finite_arrays({f"{name} {part}": v for name, a, b, _ in entries for part, v in (("A", a), ("B", b))},
                             f"LoRA for {path}")  # a trained LoRA gone non-finite is never written
    if format == "diffusers":
        tensors, metadata = _diffusers_tensors(entries)
    elif format == "kohya":
        if family is None:
            raise GlanceError("format='kohya' names modules as the model's family does: pass family")
        if family.lora_file_names is not None:
            tensors = family.lora_file_names.kohya_tensors(tree, entries)
        else:
            tensors = {}
            for name, a, b, alpha in entries:
                stem = "lora_unet_" + name.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = a.T, b.T
                tensors[f"{stem}.alpha"] = np.asarray(alpha, np.float32)
        metadata = {"format": "pt"}
    else:
        raise GlanceError(f"unknown LoRA format {format!r}: use 'diffusers' or 'kohya'")
    if guidance_embedder(tree) is not None:
        tensors.update(_embedder_tensors(guidance_embedder(tree)))
    if schedule is not None:
        metadata[SCHEDULE_KEY] = json.dumps(schedule.to_dict())
    if guidance is not None:
        metadata[GUIDANCE_KEY] = json.dumps(guidance)
    gaps = consumer_gaps(family, format, [name for name, *_ in entries])
    if gaps:
        log.warning("LoRA export (%s layout): %s", format, "; ".join(gaps))
    safetensors_io.save_file(tensors, path, metadata)


def consumer_gaps(family, format, modules):
    """[one phrase per consumer that drops or refuses some of `modules` in a `format` file of `family`]."""
    if family is None:
        return []
    gaps = []
    for layout, consumer, action, pattern in family.consumer_gaps:
        hit = sorted(m for m in modules if re.fullmatch(pattern, m))
        if layout == format and hit:
            gaps.append(f"{consumer} {action} {', '.join(hit)}")
    for layout, consumer, needed in family.consumer_needs:
        if layout == format and not set(needed) <= set(modules):
            gaps.append(f"{consumer} does not take it for a {family.name} LoRA without {' and '.join(needed)} LoRAs "
                        f"(format='kohya' loads there)")
    return gaps


def _diffusers_tensors(entries):
    """(tensors, metadata) of the diffusers layout, with each layer's scale alpha / r folded into lora_B.

    ComfyUI and InvokeAI ignore the `lora_adapter_metadata` entry and apply such files at scale 1; with
    the scale in lora_B and lora_alpha = r there, diffusers, ComfyUI and InvokeAI all apply the LoRA as
    trained. The trained alphas are kept under `glance_lora_alpha`, so `load_lora` gives back the tree.
    """
    tensors = {}
    for name, a, b, alpha in entries:
        tensors[f"transformer.{name}.lora_A.weight"] = a.T
        tensors[f"transformer.{name}.lora_B.weight"] = (b * np.float32(alpha / a.shape[1])).T
    ranks = {name: a.shape[1] for name, a, _, _ in entries}
    r = _most_common(ranks.values())
    others = {n: v for n, v in ranks.items() if v != r}
    config = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": others,
              "alpha_pattern": others}
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True),
                FOLDED_KEY: json.dumps({name: alpha for name, _, _, alpha in entries}, sort_keys=True)}
    return tensors, metadata
