"""Device meshes and shardings for the frozen base, the LoRA, the optimizer state and the batch.

Every parameter gets logical axis names from its place in the tree (a Dense
kernel is ("in", "out"), a stacked one ("layers", "in", "out"), a LoRA's A
is ("in", "rank") and B ("rank", "out"), a bias ("out",)); rules map logical
names to mesh axes. The default rules shard kernels' input dimension over
`fsdp` and output dimension over `tensor`, and batches over `data`. A
dimension that a mesh axis does not divide stays whole (replicated), so any
mesh is valid for any model.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glance_jax.errors import GlanceError
from glance_jax.layout import is_block_stack

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (("batch", "data"), ("in", "fsdp"), ("out", "tensor"), ("layers", None), ("rank", None))


def parse_mesh(text):
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4}."""
    mesh = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise GlanceError(f"mesh {text!r}: use axis=size pairs with axes {', '.join(MESH_AXES)}, "
                              "e.g. data=2,fsdp=4")
        mesh[name] = int(size)
    return mesh


def make_mesh(axes, devices=None):
    """A Mesh with axes (data, fsdp, tensor) of the given sizes (missing axes have size 1) over all devices."""
    axes = parse_mesh(axes) if isinstance(axes, str) else dict(axes)
    devices = jax.devices() if devices is None else devices
    sizes = [axes.get(name, 1) for name in MESH_AXES]
    if math.prod(sizes) != len(devices):
        raise GlanceError(f"mesh {axes} needs {math.prod(sizes)} devices, there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(keys, ndim):
    """Logical axis names of a leaf from the dict keys on its path (parameters, LoRA or optimizer state)."""
    leaf = keys[-1] if keys else None
    if leaf == "kernel":
        names = (None,) * (ndim - 2) + ("in", "out")
    elif leaf == "A":
        names = (None,) * (ndim - 2) + ("in", "rank")
    elif leaf == "B":
        names = (None,) * (ndim - 2) + ("rank", "out")
    elif leaf in ("bias", "kernel_scale"):  # kernel_scale: a quantized kernel's scale per output channel
        names = (None,) * (ndim - 1) + ("out",)
    else:
        names = (None,) * ndim
    if keys and is_block_stack(keys[0]) and ndim:
        names = ("layers",) + names[1:]
    return names


def spec(names, shape, mesh, rules=DEFAULT_RULES):
    """A PartitionSpec from logical names; undivided dimensions and reused mesh axes stay unsharded."""
    rules, used, out = dict(rules), set(), []
    for name, size in zip(names, shape):
        axis = rules.get(name)
        if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return PartitionSpec(*out)


def _keys(path):
    return tuple(getattr(k, "key", None) for k in path if hasattr(k, "key"))


def tree_shardings(tree, mesh, rules=DEFAULT_RULES):
    """NamedShardings for every leaf of a parameter, LoRA or optimizer-state tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec(logical_axes(_keys(path), len(x.shape)), x.shape, mesh, rules)),
        tree)


def batch_sharding(mesh, shape, rules=DEFAULT_RULES):
    """Data-parallel sharding of an array whose first axis is the batch (replicated if `data` does not divide it)."""
    return NamedSharding(mesh, spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def bytes_per_device(tree, shardings):
    """Bytes of one device's shard of every leaf, summed (the largest device, for uneven layouts)."""
    total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def place(tree, shardings):
    """Puts host or device arrays onto their shardings (works across processes: each takes its own shards)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index, x=x: np.asarray(x[index])),
        tree, shardings)
