"""The one loader: PyTorch checkpoints (diffusers folders, BFL single files) and converted Flax folders.

Every format is first turned into a `Checkpoint`: a config dict and, for each
diffusers tensor name, the file pieces (row ranges of stored tensors) that
make it up. `weight_table(params)` says where each diffusers name lives in the
Flax parameter tree: the parameter path joined with dots, the block index put
back after the stack's name, `kernel` <-> `weight` (transposed), `scale` <->
`weight`, `bias` <-> `bias`. Names and shapes are checked against that table
before any data is read; then tensors are read one at a time into
preallocated arrays of the target dtype, so peak host memory is about the
size of the output. LoRA import/export uses the same table.
"""

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from glance_jax import quantize as quant
from glance_jax import safe_io, sharding
from glance_jax.checkpoints import hub, safetensors_io
from glance_jax.errors import GlanceError
from glance_jax.layout import is_block_stack

FORMAT_FILE = "glance_jax.json"  # marks a folder written by `convert_checkpoint`
PARAMS_DIR = "params"
DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "fp16": jnp.float16, "float16": jnp.float16}


def class_name(config):
    """diffusers configs name the class in `_class_name`, transformers configs in `architectures`."""
    return config.get("_class_name") or (config.get("architectures") or [None])[0]


def parse_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GlanceError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


# ---- where each torch tensor goes ----

@dataclasses.dataclass(frozen=True)
class Slot:
    """The place of one torch tensor in the Flax tree: leaf path, block index (or None), transpose."""

    path: tuple
    index: int | None
    transpose: bool  # kernels: torch Linear (out, in) <-> (in, out); Conv (out, in, *k) <-> (*k, in, out)
    torch_shape: tuple

    def to_flax(self, value):
        """A torch tensor (or a slab of its leading rows) in this slot's Flax layout."""
        if not self.transpose:
            return value
        return value.T if value.ndim == 2 else value.transpose(*range(2, value.ndim), 1, 0)


def _torch_shape(flax_shape, transpose):
    if not transpose:
        return tuple(flax_shape)
    if len(flax_shape) == 2:
        return tuple(flax_shape[::-1])
    return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])


_TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "gamma": "gamma", "embedding": "weight"}


def abstract_params(model):
    """The parameter tree as ShapeDtypeStructs: no allocation, no compute."""
    return jax.eval_shape(model.init_params, jax.random.PRNGKey(0))


def weight_table(params):
    """{diffusers tensor name: Slot} for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    table = {}
    for path, leaf in flatten_dict(params).items():
        *modules, leaf_name = path
        if leaf_name == quant.SCALE:  # a quantized kernel's scales: computed from its weight, no torch tensor
            continue
        transpose = leaf_name == "kernel"
        torch_leaf = _TORCH_LEAF[leaf_name]
        if is_block_stack(modules[0]):
            for i in range(leaf.shape[0]):
                name = ".".join([modules[0], str(i), *modules[1:], torch_leaf])
                table[name] = Slot(path, i, transpose, _torch_shape(leaf.shape[1:], transpose))
        else:
            table[".".join([*modules, torch_leaf])] = Slot(path, None, transpose, _torch_shape(leaf.shape, transpose))
    return table


# ---- checkpoints on disk ----

@dataclasses.dataclass
class Tensor:
    """One diffusers tensor, made of row ranges of tensors stored in safetensors files."""

    shape: tuple
    pieces: list  # [(SafetensorsFile, stored name, (row start, row stop) or None for all rows), ...]

    def read(self):
        """The whole tensor as one array."""
        out = np.empty(self.shape, self.pieces[0][0].tensors[self.pieces[0][1]].dtype)
        for start, chunk in self.chunks():
            out[start:start + len(chunk)] = chunk
        return out

    def read_rows(self, start, stop):
        """Rows [start, stop) of the tensor, reading only the stored rows they come from."""
        parts, offset = [], 0
        for f, name, rows in self.pieces:
            info = f.tensors[name]
            lo, hi = rows or (0, info.shape[0])
            a, b = max(start, offset), min(stop, offset + hi - lo)
            if a < b:
                parts.append(f.read(name, (lo + a - offset, lo + b - offset)))
            offset += hi - lo
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def chunks(self, max_bytes=16 * 2 ** 20):
        """Yields (first row, rows) in pieces of at most about `max_bytes`, so that huge tensors are never whole."""
        offset = 0
        for f, name, rows in self.pieces:
            info = f.tensors[name]
            start, stop = rows or (0, info.shape[0])
            step = max(1, max_bytes * info.shape[0] // max(1, info.nbytes))
            for lo in range(start, stop, step):
                yield offset + lo - start, f.read(name, (lo, min(stop, lo + step)))
            offset += stop - start


@dataclasses.dataclass
class Checkpoint:
    config: dict
    tensors: dict  # diffusers name -> Tensor; empty for a converted folder
    converted_dir: str | None = None


def _weight_map(folder, index_name):
    """The `weight_map` of a sharded checkpoint's index, type-checked, every file kept inside `folder`."""
    where = os.path.join(folder, index_name)
    index = safe_io.read_json(where)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise GlanceError(f"{where}: not a safetensors index (a JSON object whose weight_map maps tensor names "
                          "to file names)")
    for file_name in set(weight_map.values()):
        normal = os.path.normpath(file_name)
        if os.path.isabs(file_name) or normal == ".." or normal.startswith(".." + os.sep) or "\0" in file_name:
            raise GlanceError(f"{where} names the file {file_name!r}, outside the model folder; an index may "
                              "only name files in its own folder")
    return weight_map


def _whole(f, name):
    info = f.tensors[name]
    return Tensor(info.shape, [(f, name, None)])


def _open_diffusers_folder(path):
    config = safe_io.read_json(os.path.join(path, "config.json"))
    index = [n for n in os.listdir(path) if n.endswith(".safetensors.index.json")]
    if index:
        weight_map = _weight_map(path, index[0])
        files = {name: safetensors_io.SafetensorsFile(os.path.join(path, name)) for name in set(weight_map.values())}
        tensors = {}
        for name, file_name in weight_map.items():
            if name not in files[file_name].tensors:
                raise GlanceError(f"{os.path.join(path, index[0])} puts {name!r} in {file_name}, which lacks it")
            tensors[name] = _whole(files[file_name], name)
        return Checkpoint(config, tensors)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        pickles = sorted(n for n in os.listdir(path) if n.endswith(safetensors_io.PICKLE_SUFFIXES))
        raise GlanceError(f"{path}: no .safetensors weights next to config.json" + (
            f"; {', '.join(pickles[:3])} are pickles, which can run any code when loaded, so glance_jax never "
            "reads them: convert them to .safetensors with a tool you trust" if pickles else ""))
    tensors = {}
    for file_name in files:
        f = safetensors_io.SafetensorsFile(os.path.join(path, file_name))
        tensors.update({name: _whole(f, name) for name in f.keys()})
    return Checkpoint(config, tensors)


def single_file_layouts(classes):
    """The single-file layouts the classes of a class table read (a class's `single_file_layout`: a module
    with `DESCRIPTION`, `recognises(names)`, `strip_prefix`, `config_from_shapes` and `to_diffusers`)."""
    layouts = [getattr(cls, "single_file_layout", None) for cls in dict.fromkeys(classes.values())]
    return tuple(dict.fromkeys(layout for layout in layouts if layout is not None))


def _open_single_file(path, layouts, axes_dims_rope=None):
    f = safetensors_io.SafetensorsFile(path)
    layout = next((layout for layout in layouts if layout.recognises(f.keys())), None)
    if layout is None:
        known = " or ".join(layout.DESCRIPTION for layout in layouts) or "a single-file checkpoint this model reads"
        raise GlanceError(f"{path}: not {known}; for diffusers weights pass the folder that holds config.json")
    shapes = {layout.strip_prefix(n): info.shape for n, info in f.tensors.items()}
    try:
        config = layout.config_from_shapes(shapes, axes_dims_rope)
    except KeyError as e:
        raise GlanceError(f"{path}: {layout.NAME} checkpoint lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise GlanceError(f"{path}: {e}") from None
    hidden = config["attention_head_dim"] * config["num_attention_heads"]
    tensors, unknown = {}, []
    for name, info in f.tensors.items():
        targets = layout.to_diffusers(name, info.shape[0] if info.shape else 0, hidden)
        if targets is None:
            unknown.append(name)
            continue
        for target, row_ranges in targets:
            rows = sum(stop - start for start, stop in row_ranges)
            tensors[target] = Tensor((rows, *info.shape[1:]), [(f, name, r) for r in row_ranges])
    if unknown:
        raise GlanceError(f"{path}: {len(unknown)} unexpected {layout.NAME} keys: {', '.join(sorted(unknown)[:8])}")
    return Checkpoint(config, tensors)


def open_checkpoint(path, classes, axes_dims_rope=None):
    """Recognises the format at `path` and returns its Checkpoint (headers only; no tensor data is read).
    `classes` (a `class_table`) says which single-file layouts a file may be in."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GlanceError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        return _open_single_file(path, single_file_layouts(classes), axes_dims_rope)
    if os.path.isfile(os.path.join(path, FORMAT_FILE)):
        return Checkpoint(safe_io.read_json(os.path.join(path, "config.json")), {}, converted_dir=path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _open_diffusers_folder(path)
    if os.path.isfile(os.path.join(path, "transformer", "config.json")):  # a whole pipeline folder
        return open_checkpoint(os.path.join(path, "transformer"), classes, axes_dims_rope)
    raise GlanceError(f"{path}: neither a diffusers model folder (config.json + safetensors), "
                      "a converted glance_jax folder, nor a .safetensors file")


# ---- pipeline folders and what a path holds, read before anything heavy ----

PIPELINE_FILE = "model_index.json"  # marks a diffusers pipeline folder

def pipeline_parts(path):
    """{component: folder} of a diffusers pipeline folder (model_index.json), or None if `path` is not one."""
    path = os.path.expanduser(os.fspath(path))
    index = os.path.join(path, PIPELINE_FILE)
    if not os.path.isfile(index):
        return None
    spec = safe_io.read_json(index)
    return {name: os.path.join(path, name) for name, value in spec.items()
            if not name.startswith("_") and os.path.isdir(os.path.join(path, name))}


def peek_class(path, classes):
    """The class name a checkpoint at `path` holds, from its config.json (single files: their key names) alone."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise GlanceError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            return "not a checkpoint"
        return class_name(_open_single_file(path, single_file_layouts(classes)).config)
    if os.path.isfile(os.path.join(path, PIPELINE_FILE)):
        return safe_io.read_json(os.path.join(path, PIPELINE_FILE)).get("_class_name", "a pipeline")
    if os.path.isfile(os.path.join(path, "config.json")):
        return class_name(safe_io.read_json(os.path.join(path, "config.json"))) or "unknown"
    return "not a checkpoint"


def component_of_class(path, cls):
    """The part of a pipeline folder that holds a `cls` model (by its config.json); other paths unchanged."""
    parts = pipeline_parts(path) if cls is not None else None
    if not parts:
        return path
    names = {cls.__name__, getattr(cls, "architecture", None)}
    for folder in parts.values():
        if os.path.isfile(os.path.join(folder, "config.json")) and peek_class(folder, {}) in names:
            return folder
    raise GlanceError(f"{path}: no part of this pipeline folder holds a {cls.__name__}")


def class_table(classes):
    """{name: class} of model classes, under diffusers' `_class_name` and transformers' `architectures` name."""
    table = {cls.__name__: cls for cls in classes}
    table.update({cls.architecture: cls for cls in classes if hasattr(cls, "architecture")})
    return table


def model_from_config(config, dtype, classes, expected_class=None, **overrides):
    """The model a config.json describes, of a class in `classes` (a `class_table`)."""
    name = class_name(config)
    if expected_class is not None and classes.get(name) is not expected_class:
        raise GlanceError(f"the checkpoint holds a {name}, not a {expected_class.__name__}")
    if name not in classes:
        raise GlanceError(f"config.json: unknown _class_name {name!r}; supported: {', '.join(sorted(classes))}")
    return classes[name].from_config(config, dtype=dtype, **overrides)


def adapt_names(model, checkpoint):
    """Applies a model's known checkpoint renames (hub prefixes) and leaves out the parts that are not it.

    Only prefixes the model class names (`key_renames`, `ignored_prefixes`: a vision tower, an LM head,
    a tied embedding copy) are touched; every other unknown key still fails the name check.
    """
    renamed = {}
    for name, tensor in checkpoint.tensors.items():
        if name.startswith(tuple(getattr(model, "ignored_prefixes", ()))):
            continue
        for old, new in getattr(model, "key_renames", ()):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = tensor
    checkpoint.tensors = renamed
    return checkpoint


def check_names_and_shapes(table, tensors, where):
    """Raises one GlanceError naming unexpected keys, missing keys or the first shape mismatches."""
    unexpected = sorted(set(tensors) - set(table))
    missing = sorted(set(table) - set(tensors))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:6])}"
                        f"{', ...' if len(unexpected) > 6 else ''})")
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
    if problems:
        raise GlanceError(f"{where}: " + "; ".join(problems))
    bad = [(n, tensors[n].shape, table[n].torch_shape) for n in sorted(table)
           if tuple(tensors[n].shape) != table[n].torch_shape]
    if bad:
        raise GlanceError(f"{where}: shape mismatch for " + "; ".join(
            f"{n} (checkpoint {tuple(got)}, model expects {want})" for n, got, want in bad[:4]))


def _leaf_dtype(path, leaf, dtype, quantize):
    """The stored dtype of a leaf: 8-bit for quantized Dense kernels, float32 scales, `dtype` for the rest."""
    if quantize and path[-1] == quant.SCALE:
        return quant.SCALE_DTYPE
    if quantize and quant.is_dense_kernel(path, leaf):
        return quant.storage_dtype(quantize)
    return dtype


def read_params(model, checkpoint, dtype, where="checkpoint", progress=None, quantize=None):
    """Fills a numpy parameter tree of `dtype` from `checkpoint`, one tensor at a time.

    With `quantize` ("fp8" or "int8") every Dense kernel is quantized while it is read, a chunk of
    output channels at a time (each channel has its own scale), so the float kernel never exists whole.
    """
    abstract = abstract_params(model)
    table = weight_table(abstract)
    check_names_and_shapes(table, checkpoint.tensors, where)
    if quantize:
        abstract = quant.abstract(abstract, quantize)
    leaves = {path: np.empty(leaf.shape, _leaf_dtype(path, leaf, dtype, quantize))
              for path, leaf in flatten_dict(abstract).items()}
    for name in (progress or (lambda x: x))(sorted(table)):
        slot = table[name]
        target = leaves[slot.path] if slot.index is None else leaves[slot.path][slot.index]
        scale_path = slot.path[:-1] + (quant.SCALE,)
        scales = None
        if slot.path[-1] == "kernel" and scale_path in leaves:
            scales = leaves[scale_path] if slot.index is None else leaves[scale_path][slot.index]
        for start, chunk in checkpoint.tensors[name].chunks():
            rows = slice(start, start + len(chunk))  # torch's leading axis is the Flax kernel's last
            if scales is not None:  # torch rows are output channels: quantized row by row
                values, scales[rows] = quant.quantize_rows(chunk, quantize)
                target[..., rows] = values.T
            elif slot.transpose:
                target[..., rows] = slot.to_flax(chunk)  # numpy casts to the target dtype while copying
            else:
                target[rows] = chunk
    return unflatten_dict(leaves)


def _read_sharded(model, checkpoint, dtype, mesh, rules, where, quantize=None):
    """Parameters placed directly on their shards: each device's block is read from the files on its own.

    A quantized kernel's block is quantized from whole output channels (their scale needs every input).
    """
    abstract = abstract_params(model)
    table = weight_table(abstract)
    check_names_and_shapes(table, checkpoint.tensors, where)
    if quantize:
        abstract = quant.abstract(abstract, quantize)
    by_leaf = {}
    for name, slot in table.items():
        by_leaf.setdefault(slot.path, []).append((slot.index, name, slot))
    shardings = flatten_dict(sharding.tree_shardings(abstract, mesh, rules))

    def reader(path, shape):
        part = "scale" if path[-1] == quant.SCALE else None
        if part is None and quantize and quant.is_dense_kernel(path, jax.ShapeDtypeStruct(shape, dtype)):
            part = "kernel"
        kernel_path = path[:-1] + ("kernel",) if part == "scale" else path
        slots = sorted(by_leaf[kernel_path], key=lambda s: -1 if s[0] is None else s[0])

        def one(name, slot, index):  # index: slices of this (unstacked) Flax leaf
            tensor = checkpoint.tensors[name]
            rows = index[-1] if slot.transpose else index[0]
            start, stop, _ = rows.indices(tensor.shape[0])
            if part is not None:  # whole output channels, quantized, then this block's inputs
                values, scale = quant.quantize_rows(tensor.read_rows(start, stop), quantize)
                return scale if part == "scale" else values.T[index[:-1] + (slice(None),)]
            value = slot.to_flax(tensor.read_rows(start, stop))
            rest = index[:-1] + (slice(None),) if slot.transpose else (slice(None),) + index[1:]
            return value[rest].astype(dtype)

        def read(index):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if slots[0][0] is None:
                return one(slots[0][1], slots[0][2], index)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([one(slots[i][1], slots[i][2], index[1:]) for i in layers])
        return read

    flat = {path: jax.make_array_from_callback(leaf.shape, shardings[path], reader(path, leaf.shape))
            for path, leaf in flatten_dict(abstract).items()}
    return unflatten_dict(flat)


def _to_device(tree):
    """numpy tree -> jax arrays, leaf by leaf, so that host and device copies never both hold the whole tree."""
    flat = flatten_dict(tree)
    for path in list(flat):
        flat[path] = jnp.asarray(flat.pop(path))
    return unflatten_dict(flat)


def _restore_converted(directory, target, shardings=None):
    """The converted parameters: host arrays, or with `shardings` sharded arrays that orbax reads shard by shard.

    `target` is the abstract parameter tree: each leaf is restored in its dtype (the compute dtype, or
    the 8-bit and float32 leaves of a quantized base, which are never cast).
    """
    import orbax.checkpoint as ocp
    dtypes = flatten_dict(target)
    kwargs = {}
    if shardings is not None:
        kwargs["args"] = ocp.args.PyTreeRestore(restore_args=unflatten_dict({
            path: ocp.ArrayRestoreArgs(sharding=s, dtype=dtypes[path].dtype)
            for path, s in flatten_dict(shardings).items()}))
    try:
        tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(directory, PARAMS_DIR)), **kwargs)
    except Exception as e:  # orbax raises many types for a damaged folder
        raise GlanceError(f"{directory}: cannot restore converted parameters ({type(e).__name__}: {e})") from None
    if shardings is not None:
        return tree
    flat = flatten_dict(tree)
    for path in list(flat):
        want = dtypes[path].dtype if path in dtypes else flat[path].dtype
        flat[path] = np.asarray(flat[path]).astype(want, copy=False)
    return unflatten_dict(flat)


def converted_quantization(directory):
    """"fp8", "int8" or None: how a converted folder stores its Dense kernels (from its format file)."""
    return safe_io.read_json(os.path.join(directory, FORMAT_FILE)).get("quantize")


def _quantization(model, checkpoint, quantize, where):
    """(kind to load, kind stored): a converted folder may already hold an fp8 or int8 base."""
    quantize = quant.check_kind(quantize)
    stored = converted_quantization(checkpoint.converted_dir) if checkpoint.converted_dir else None
    if stored and quantize and stored != quantize:
        raise GlanceError(f"{where} holds a {stored} base; it cannot be loaded as {quantize}")
    kind = quantize or stored
    if kind and not getattr(model, "quantizable", False):
        raise GlanceError(f"quantize={kind}: only the diffusion transformers are quantized, "
                          f"not a {type(model).__name__}")
    return kind, stored


def load_model(path, dtype=jnp.float32, expected_class=None, axes_dims_rope=None, mesh=None, rules=None,
               quantize=None, classes=None, **overrides):
    """`(model, params)` from any supported checkpoint at `path`, parameters in `dtype`.

    Without `mesh` the parameters go to the default device. With a `jax.sharding.Mesh` each one is
    sharded by `glance_jax.sharding` (with `rules`, default its DEFAULT_RULES) and every device's block
    is read from disk on its own: no full copy on any device or host. A pipeline folder gives its
    transformer, or with `expected_class` the part that holds that class (its VAE, a text encoder).
    `classes` (a `class_table`; `glance_jax.families.CLASSES` holds every model) are the classes the
    checkpoint may hold; by default `expected_class` alone.

    `quantize="fp8"` or `"int8"` stores every Dense kernel of a transformer as 8-bit values with one
    scale per output channel (glance_jax.quantize), quantized while reading; `dtype` is then the compute
    dtype and that of the other leaves. A folder written by `convert --quantize` loads as it is stored.
    """
    dtype = parse_dtype(dtype)
    classes = classes if classes is not None else class_table([expected_class])
    path = hub.resolve(path, parts=hub.PIPELINE_PARTS if expected_class else ("transformer",))
    path = component_of_class(path, expected_class)
    checkpoint = open_checkpoint(path, classes, axes_dims_rope)
    model = model_from_config(checkpoint.config, dtype, classes, expected_class, **overrides)
    adapt_names(model, checkpoint)
    kind, stored = _quantization(model, checkpoint, quantize, os.fspath(path))
    abstract = abstract_params(model)
    stored_tree = quant.abstract(abstract, stored) if stored else abstract  # what a converted folder holds
    if mesh is not None:
        rules = rules or sharding.DEFAULT_RULES
        if checkpoint.converted_dir:
            params = _restore_converted(checkpoint.converted_dir, stored_tree,
                                        sharding.tree_shardings(stored_tree, mesh, rules))
            return model, quant.quantize_params(params, kind) if kind != stored else params
        return model, _read_sharded(model, checkpoint, dtype, mesh, rules, os.fspath(path), kind)
    if checkpoint.converted_dir:
        params = _restore_converted(checkpoint.converted_dir, stored_tree)
        expected = {path: leaf.shape for path, leaf in flatten_dict(stored_tree).items()}
        got = {path: leaf.shape for path, leaf in flatten_dict(params).items()}
        if got != expected:
            raise GlanceError(f"{path}: converted parameters do not match its config.json")
        if kind != stored:
            params = quant.quantize_params(params, kind)
    else:
        params = read_params(model, checkpoint, dtype, where=os.fspath(path), quantize=kind)
    return model, _to_device(params)


# ---- conversion ----

def remove_stale_partials(dst):
    """Removes `dst.partial-PID` / `dst.old-PID` folders left by killed conversions (whose PID is gone)."""
    for leftover in glob.glob(glob.escape(dst) + ".partial-*") + glob.glob(glob.escape(dst) + ".old-*"):
        pid = leftover.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not safe_io.process_alive(int(pid)):
            logging.getLogger(__name__).warning("removing %s, left by a conversion that was killed", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dst, overwrite=False):
    """Yields a scratch folder that becomes `dst` only if the block succeeds; nothing is left behind otherwise."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(dst) and not overwrite:
        raise GlanceError(f"{dst} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise GlanceError(f"{parent}: no such folder")
    remove_stale_partials(dst)
    tmp = f"{dst}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise GlanceError(f"cannot write in {parent} ({e.strerror})") from None
    try:
        yield tmp
        if os.path.lexists(dst):  # a symbolic link is moved aside itself: its target is never touched
            old = f"{dst}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            os.remove(old) if os.path.islink(old) else shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_converted(directory, model, params, dtype, quantize=None):
    """Writes config.json, the format marker and the orbax parameter checkpoint into `directory`."""
    import orbax.checkpoint as ocp
    # Orbax's defaults copy every host array before writing and buffer 2 GB data files: together about
    # twice the output in extra memory. The arrays here are not touched again, and small data files
    # are flushed as they fill.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    checkpointer.save(os.path.join(directory, PARAMS_DIR),
                      args=ocp.args.PyTreeSave(params, ocdbt_target_data_file_size=16 * 2 ** 20))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.to_config(), f, indent=2)
    with open(os.path.join(directory, FORMAT_FILE), "w") as f:
        json.dump({"format": "glance_jax-orbax", "version": 1, "dtype": jnp.dtype(dtype).name,
                   "quantize": quantize}, f, indent=2)


def diffusers_state_dict(params):
    """{diffusers tensor name: numpy array} of a parameter tree: the inverse table lookup."""
    state, flat = {}, flatten_dict(params)
    for name, slot in weight_table(params).items():
        value = np.asarray(flat[slot.path])
        value = value if slot.index is None else value[slot.index]
        if slot.transpose:  # the inverse of Slot.to_flax
            value = value.T if value.ndim == 2 else value.transpose(value.ndim - 1, value.ndim - 2,
                                                                    *range(value.ndim - 2))
        state[name] = value
    return state


def save_diffusers(model, params, directory):
    """Writes `params` as a diffusers model folder (config.json + safetensors)."""
    state = diffusers_state_dict(params)
    os.makedirs(directory, exist_ok=True)
    safetensors_io.save_file(state, os.path.join(directory, "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    safe_io.write_json(os.path.join(directory, "config.json"), model.to_config(), indent=2)


def convert_checkpoint(src, dst, classes, dtype="bf16", overwrite=False, axes_dims_rope=None, progress=None,
                       quantize=None):
    """Converts a PyTorch checkpoint (diffusers folder or BFL file) to a Flax (orbax) folder at `dst`.

    Streams tensor by tensor into host arrays of the output dtype; `dst`
    appears only when everything was written. With `quantize` ("fp8", "int8") the Dense kernels are
    stored quantized (about half the bf16 size) and load as they are, without quantizing again.
    """
    dtype = parse_dtype(dtype)
    checkpoint = open_checkpoint(src, classes, axes_dims_rope)
    if checkpoint.converted_dir:
        raise GlanceError(f"{src} is already a converted glance_jax folder")
    model = model_from_config(checkpoint.config, dtype, classes)
    adapt_names(model, checkpoint)
    kind, _ = _quantization(model, checkpoint, quantize, os.fspath(src))
    check_names_and_shapes(weight_table(abstract_params(model)), checkpoint.tensors, os.fspath(src))
    with atomic_directory(dst, overwrite) as tmp:
        params = read_params(model, checkpoint, dtype, where=os.fspath(src), progress=progress, quantize=kind)
        save_converted(tmp, model, params, dtype, kind)
    return model
