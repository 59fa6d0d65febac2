"""What XLA says a program costs, from abstract shapes: how this project measures models it cannot allocate.

XLA's HLO cost analysis counts the body of a loop once, so FLOPs are counted
on a copy of the model whose block scan is unrolled and whose attention is the
plain XLA one (`for_cost_analysis`); the lowered, unoptimised program is
enough, so nothing is compiled for that. Peak memory comes from compiling the
real (scanned) program and reading `memory_analysis()`.
"""

import jax


def for_cost_analysis(model):
    """The same model with every block visible to XLA's cost analysis (unrolled scan, XLA attention)."""
    return model.clone(scan_unroll=True, attention_impl="xla")


def flops(fn, *args, **kwargs):
    """FLOPs of `fn(*args, **kwargs)` as XLA's HLO cost analysis counts them; args may be ShapeDtypeStructs."""
    cost = jax.jit(fn).lower(*args, **kwargs).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def abstract(tree, dtype=None):
    """ShapeDtypeStructs for a tree of arrays (or of ShapeDtypeStructs), optionally cast to `dtype`."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)
