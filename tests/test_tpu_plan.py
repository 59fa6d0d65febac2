"""`glance-jax plan --target <TPU slice>`: tiny models compiled by XLA's TPU compiler through libtpu (no TPU
here), the compiler's out-of-memory refusal as a line, and the errors for a missing libtpu and a wrong mesh."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from glance_jax import plan
from glance_jax.models import FluxTransformer2DModel

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=4, joint_attention_dim=64,
            pooled_projection_dim=32, guidance_embeds=True)


def tiny(attention="auto"):
    return FluxTransformer2DModel(**TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=attention)


def cli(*args, prelude=""):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = prelude + "import sys\nfrom glance_jax.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "plan", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_tiny_train_step_on_a_v5e_4_slice_with_splash_attention():
    """The LoRA train step on 4 v5e chips (fsdp=4, splash inside shard_map): the TPU's figures, CPU stays default."""
    args = plan.parser().parse_args(["--model", "flux-dev", "--task", "train", "--target", "v5e-4",
                                     "--resolution", "256", "--json"])
    r = plan.plan(args, model=tiny())
    print({k: r[k] for k in ("peak_bytes_per_device", "optimal_seconds_per_step", "seconds_per_step_at_peak",
                             "compile_seconds")})
    assert (r["target"], r["backend"], r["attention"], r["devices"], r["mesh"]) == (
        "v5e-4", "tpu", "splash", 4, {"fsdp": 4})
    assert r["hbm_bytes_per_chip"] == int(15.75 * 2 ** 30) and r["fits"] is True
    assert 0 < r["params_bytes_per_device"] < r["peak_bytes_per_device"] < r["hbm_bytes_per_chip"]
    assert r["compiler_flops_per_device"] > 0 and "optimal_seconds_per_step" in r
    json.dumps(r)  # the --json line
    assert "fits (" in plan.table(r)
    assert jax.default_backend() == "cpu" and jax.devices()[0].platform == "cpu"  # planning left the backend alone


def test_the_compilers_out_of_memory_is_a_line():
    """XLA's attention at 4096 x 4096 (65,536 tokens) needs far more than a v5e chip: "does not fit"."""
    args = plan.parser().parse_args(["--model", "flux-dev", "--task", "sample", "--target", "v5e-1",
                                     "--resolution", "4096", "--attention", "xla"])
    r = plan.plan(args, model=tiny("xla"))
    assert r["fits"] is False and r["hbm_bytes_per_chip"] == int(15.75 * 2 ** 30)
    assert r["peak_bytes_per_device"] > 2 * r["hbm_bytes_per_chip"]
    line = plan.fit_line(r)
    assert line.startswith("does not fit: needs ") and line.endswith(" of 15.75 GiB")
    assert line in plan.table(r)


def test_missing_libtpu_names_the_extra():
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'libtpu': raise ImportError(name)\nsys.meta_path.insert(0, Block())\n")
    out = cli("--model", "flux-dev", "--target", "v5e-8", prelude=blocker)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        "glance-jax plan: error: --target v5e-8 compiles with XLA's TPU compiler: install the libtpu extra "
        "(pip install 'glance_jax[tpu-plan]')")


def test_mesh_that_does_not_cover_the_slice():
    out = cli("--model", "flux-dev", "--target", "v5e-4", "--mesh", "fsdp=8")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        "glance-jax plan: error: mesh fsdp=8 has 8 positions, v5e-4 has 4 chips")


@pytest.mark.parametrize("target, chips, kind", [("v5e-1", 1, "TPU v5 lite"), ("v6e-8", 8, "TPU v6 lite"),
                                                 ("v5p-8", 4, "TPU v5")])
def test_every_slice_is_described(target, chips, kind):
    devices = plan.tpu_devices(target)
    assert len(devices) == chips and devices[0].device_kind == kind
