"""Attention kernels: Pallas splash attention (interpret mode on CPU) against XLA's attention inside the tiny
FLUX and Qwen-Image models, forward and gradient, in fp32; the "auto" choice per platform and the cuDNN call."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glance_jax.models import FluxTransformer2DModel, QwenImageTransformer2DModel
from glance_jax.modules import attention

TOL = 1e-5  # relative to the largest magnitude of each compared tree
HERE = os.path.dirname(os.path.abspath(__file__))


def rel_err(a, b):
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30)) for x, y in leaves)


def compare(model, inputs, seed):
    """Output and parameter gradient of `model` with splash attention vs XLA's: both relative errors."""
    params = model.init_params(jax.random.PRNGKey(seed))
    weights = jax.random.normal(jax.random.PRNGKey(seed + 1), (1,), jnp.float32)

    def run(impl):
        m = model.clone(attention_impl=impl)
        out = m.apply({"params": params}, **inputs)
        grad = jax.grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, **inputs)) * weights))(params)
        return out, grad

    (out_x, grad_x), (out_s, grad_s) = run("xla"), run("splash")
    return rel_err(out_x, out_s), rel_err(grad_x, grad_s)


def test_splash_matches_xla_in_flux():
    """Joint text + image attention without a mask; 7 + 30 tokens, padded to 128 inside the kernel."""
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                                   axes_dims_rope=(4, 6, 6))
    rng = np.random.default_rng(0)
    inputs = model.example_inputs(batch=2, image_tokens=30, text_tokens=7)
    inputs = {k: None if v is None else jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
              for k, v in inputs.items()}
    inputs["img_ids"] = jnp.asarray(rng.integers(0, 8, (30, 3)), jnp.float32)
    out, grad = compare(model, inputs, seed=0)
    print(f"FLUX splash vs XLA: output {out:.2e}, gradient {grad:.2e}")
    assert out <= TOL and grad <= TOL


def test_splash_matches_xla_in_qwen_image_with_padding_masks():
    """Text padding in any pattern (holes, trailing, none) per sample, expressed as splash segment ids."""
    model = QwenImageTransformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                        joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
    rng = np.random.default_rng(1)
    inputs = model.example_inputs(batch=3, height=4, width=6, text_tokens=9)
    for name in ("hidden_states", "encoder_hidden_states", "timestep"):
        inputs[name] = jnp.asarray(rng.random(inputs[name].shape), jnp.float32)
    inputs["encoder_hidden_states_mask"] = jnp.asarray([[1, 0, 1, 1, 0, 1, 0, 0, 1],
                                                        [1, 1, 1, 1, 1, 0, 0, 0, 0],
                                                        [1, 1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    out, grad = compare(model, inputs, seed=2)
    print(f"Qwen-Image splash vs XLA (masked): output {out:.2e}, gradient {grad:.2e}")
    assert out <= TOL and grad <= TOL


def test_splash_under_a_mesh_runs_per_device_in_shard_map():
    """4 host devices, data=2 x fsdp=2: batch and heads split, one kernel per device, same result as XLA's."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from glance_jax import sharding
from glance_jax.modules import attention
mesh = sharding.make_mesh("data=2,fsdp=2")
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 4, 16)), jnp.float32) for _ in range(3))
mask = jnp.asarray(rng.random((2, 40)) > 0.3).at[:, 10:].set(True)
loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention.attention(q, k, v, mask, impl)))
want = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
with jax.set_mesh(mesh):
    fn = jax.jit(jax.value_and_grad(loss("splash"), argnums=(0, 1, 2)))
    text = fn.lower(q, k, v).as_text()
    got = fn(q, k, v)
err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(jax.tree_util.tree_leaves(want),
                                                                               jax.tree_util.tree_leaves(got)))
print("shard_map" in text or "sdy.manual_computation" in text, err)
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    manual, err = out.stdout.split()[-2:]
    print("splash under data=2,fsdp=2 vs XLA:", err)
    assert manual == "True" and float(err) <= TOL


@pytest.mark.parametrize("platform, kernel", [("tpu", "splash"), ("gpu", "cudnn"), ("cuda", "cudnn"),
                                              ("cpu", "blocked"), ("rocm", "xla")])
def test_auto_picks_the_kernel_of_the_target_platform(platform, kernel):
    with attention.compiling_for(platform):
        assert attention.resolve("auto") == kernel
        assert attention.resolve("xla") == "xla"  # a named kernel is used as named
    assert attention.resolve("auto") == ("blocked" if jax.default_backend() == "cpu" else attention.resolve("auto"))
    with pytest.raises(ValueError, match="splash"):
        attention.resolve("flash")


def test_auto_on_gpu_calls_cudnn_flash_attention(monkeypatch):
    """The GPU path: jax.nn.dot_product_attention with implementation="cudnn" and the key mask (no kernel runs)."""
    calls = []

    def record(q, k, v, mask=None, implementation=None):
        calls.append((implementation, None if mask is None else mask.shape))
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    q = jnp.zeros((2, 5, 3, 8))
    with attention.compiling_for("gpu"):
        attention.attention(q, q, q, jnp.ones((2, 5), bool), "auto")
        attention.attention(q, q, q, None, "auto")
    attention.attention(q, q, q, None, "xla")
    assert calls == [("cudnn", (2, 1, 1, 5)), ("cudnn", None), (None, None)]
