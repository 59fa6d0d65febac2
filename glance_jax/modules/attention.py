"""Attention kernels by name: XLA's, blocked (CPU), Pallas splash (TPU) and cuDNN flash (GPU).

All take q, k, v of shape (B, S, heads, head_dim) and an optional key mask
(B, S) with True = attend (Qwen-Image's text padding, any pattern), and
compute the same softmax(q k^T / sqrt(head_dim)) v with the softmax in
float32. "auto" picks by the platform the program is compiled for: splash on
TPU, cuDNN on GPU, blocked on CPU, XLA's elsewhere. That platform is
`jax.default_backend()` unless a caller compiling ahead of time for another
one (the planner, for a TPU slice) says otherwise with `compiling_for`.

Splash attention never materialises the (S, S) logits, in the forward or the
backward pass. It is a per-device kernel: under a mesh (`jax.set_mesh`) it
runs inside `shard_map`, batch split over `data` and heads over the other
axes where they divide. Off TPU it runs in Pallas' interpret mode (slow; for
tests). Sequences are padded to a multiple of 128 and the padding, with the
masked keys, is excluded through splash's segment ids: every query has id 0,
real keys 0 and excluded keys 1, which is exactly "attend to the unmasked keys".
"""

import contextlib

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("auto", "xla", "blocked", "splash", "cudnn")
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "blocked"}
_TARGET = []  # the platform set by `compiling_for`, innermost last


@contextlib.contextmanager
def compiling_for(platform):
    """Within this block, "auto" and splash's interpret mode follow `platform` ("tpu", "gpu", "cpu")."""
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def target_platform():
    """The platform being compiled for: the innermost `compiling_for`, else JAX's default backend."""
    return _TARGET[-1] if _TARGET else jax.default_backend()


def resolve(implementation):
    """The kernel "auto" stands for on the target platform; other names are returned as they are."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    return AUTO.get(target_platform(), "xla") if implementation == "auto" else implementation


def attention(q, k, v, mask=None, implementation="auto"):
    """Scaled dot-product attention with the named kernel (see the module docstring)."""
    implementation = resolve(implementation)
    if implementation == "splash":
        return splash_attention(q, k, v, mask)
    if implementation == "blocked":
        return blocked_attention(q, k, v, mask)
    mask = None if mask is None else mask[:, None, None, :]
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def blocked_attention(q, k, v, mask=None, block_bytes=16 * 2 ** 20):
    """Exact attention computed one block of queries at a time (same math as `jax.nn.dot_product_attention`).

    On CPU, XLA's version materialises all (B, heads, S, S) logits and runs
    3-5x slower than PyTorch's blocked kernel; here the logits of one block
    stay around 16 MB.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q = q.transpose(0, 2, 1, 3) * jnp.asarray(head_dim ** -0.5, q.dtype)  # (B, N, T, H)
    k_t = k.transpose(0, 2, 3, 1)  # (B, N, H, S)
    v = v.transpose(0, 2, 1, 3)  # (B, N, S, H)
    bias = None if mask is None else jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]

    def block(q_block):
        logits = jnp.matmul(q_block, k_t, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.matmul(probs, v)

    n_blocks = -(-4 * batch * heads * kv_len * q_len // block_bytes)
    if n_blocks <= 1:
        out = block(q)
    else:
        rows = -(-q_len // n_blocks)
        q = jnp.pad(q, ((0, 0), (0, 0), (0, n_blocks * rows - q_len), (0, 0)))
        q = q.reshape(batch, heads, n_blocks, rows, head_dim).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(block, q).transpose(1, 2, 0, 3, 4).reshape(batch, heads, -1, head_dim)[:, :, :q_len]
    return out.transpose(0, 2, 1, 3)


# ---------------------------------------------------------------- splash (TPU)

def splash_attention(q, k, v, mask=None):
    """Splash attention on (B, S, heads, head_dim); under a mesh, one kernel per device inside `shard_map`."""
    if mask is None:
        mask = jnp.ones(k.shape[:2], bool)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash_local(q, k, v, mask)
    batch_spec, head_spec = _splash_specs(mesh, q.shape[0], q.shape[2])
    qkv_spec = PartitionSpec(batch_spec, None, head_spec, None)
    return jax.shard_map(_splash_local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec,
                                                             PartitionSpec(batch_spec, None)),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, mask)


def _splash_specs(mesh, batch, heads):
    """Mesh axes for the batch (`data`, when it divides the batch) and the heads (the others, while they divide)."""
    batch_axis = "data" if "data" in mesh.axis_names and batch % mesh.shape["data"] == 0 else None
    head_axes, size = [], 1
    for name in mesh.axis_names:
        if name != batch_axis and mesh.shape[name] > 1 and heads % (size * mesh.shape[name]) == 0:
            head_axes.append(name)
            size *= mesh.shape[name]
    return batch_axis, tuple(head_axes) or None


def _splash_local(q, k, v, mask):
    """One device's splash attention: pad to a multiple of 128, scale q, run the kernel per sample."""
    batch, length, heads, head_dim = q.shape
    padded = -(-length // 128) * 128
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kv_ids = jnp.pad(jnp.where(mask, 0, 1).astype(jnp.int32), ((0, 0), (0, padded - length)), constant_values=1)
    kernel = _splash_kernel(heads, padded, target_platform() != "tpu")
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    def one(q1, k1, v1, ids):
        return kernel(q1, k1, v1, SegmentIds(q=jnp.zeros_like(ids), kv=ids))

    out = jax.vmap(one)(pad(q * jnp.asarray(head_dim ** -0.5, q.dtype)), pad(k), pad(v), kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :length]


def _splash_kernel(heads, length, interpret):
    """A splash kernel for `heads` heads over a full (length x length) mask, blocks of up to 512.

    Made anew in each trace, not cached: its block tables become arrays of the calling trace.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    block = next(b for b in (512, 256, 128) if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.FullMask((length, length))] * heads)
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
