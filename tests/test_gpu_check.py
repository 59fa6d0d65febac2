"""benchmarks/gpu_check.py --tiny: every code path of the GPU check at tiny sizes on the CPU.

The check's table is asserted field by field (every row present, no error, figures finite and positive
where measured, FLOP bounds consistent with the measured rate), never its times. The planner's remat
choice it uses is checked on programs of known sizes.
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import pytest

from glance_jax import plan
from glance_jax.errors import GlanceError

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
ROWS = [  # (part, what) in the order the check measures them; on the CPU "auto" attention is the blocked one
    ("matmul", "bf16 jnp.dot, 256 x 256 x 256"),
    ("flux", "Flax forward, blocked attention"), ("flux", "Flax 10-step Glance loop, blocked attention"),
    ("flux", "Flax forward, xla attention"), ("flux", "Flax 10-step Glance loop, xla attention"),
    ("flux_torch", "diffusers forward, torch SDPA"), ("flux_torch", "diffusers FluxPipeline, 10 steps"),
    ("flux_train", "Flax LoRA train step, bf16 base"), ("flux_train", "Flax LoRA train step, fp8 base"),
    ("flux_train_torch", "diffusers + peft + AdamW train step, bf16 base"),
    ("qwen", "Flax true-CFG step (2 passes), blocked attention"),
    ("qwen", "Flax 10-step Glance loop with true CFG, blocked attention"),
    ("qwen", "Flax true-CFG step (2 passes), xla attention"),
    ("vae", "Flax decode, fp32"), ("vae", "diffusers AutoencoderKL.decode, fp32"),
]
BOUNDED = {"flux", "flux_torch", "qwen"}  # parts whose rows carry a FLOP bound


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(gpu_check, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    status = gpu_check.main(["--tiny", "--out", str(out)])
    with open(out / "gpu_check.json") as f:
        doc = json.load(f)
    return status, doc, (out / "gpu_check.md").read_text()


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_check_measures_every_row(tiny):
    status, doc, _ = tiny
    errors = [(r["part"], r["what"], r["error"]) for r in doc["rows"] if "error" in r]
    assert errors == [] and status == 0
    assert [(r["part"], r["what"]) for r in doc["rows"]] == ROWS
    assert doc["backend"] == "cpu" and doc["sizes"] == "tiny"
    assert all(positive(r["ms"]) and positive(r["first_s"]) and positive(r["at_s"]) for r in doc["rows"])


def test_flop_bounds_follow_the_measured_rate(tiny):
    rows = {(r["part"], r["what"]): r for r in tiny[1]["rows"]}
    matmul = rows[ROWS[0]]
    rate = 1e3 * matmul["tflop"] / matmul["ms"]  # TFLOP/s
    assert matmul["tflop"] == 2 * 256 ** 3 / 1e12
    for (part, _), row in rows.items():
        if part in BOUNDED:
            assert positive(row["tflop"]) and positive(row["of_bound"])
            assert row["bound_ms"] == pytest.approx(1e3 * row["tflop"] / rate, rel=1e-9)
            assert row["of_bound"] == pytest.approx(row["bound_ms"] / row["ms"], rel=1e-9)
    forward = rows[("flux", "Flax forward, xla attention")]["tflop"]
    assert rows[("flux", "Flax forward, blocked attention")]["tflop"] == forward  # same model, same count
    assert rows[("flux", "Flax 10-step Glance loop, xla attention")]["tflop"] == pytest.approx(10 * forward)
    assert rows[("flux_torch", "diffusers forward, torch SDPA")]["tflop"] == forward
    cfg_step = rows[ROWS[10]]["tflop"]
    assert rows[ROWS[12]]["tflop"] == cfg_step
    assert rows[ROWS[11]]["tflop"] == pytest.approx(10 * cfg_step)  # 10 steps of 2 passes
    assert rows[ROWS[11]]["note"].startswith("20 passes")


def test_train_rows_name_the_remat_policy_and_the_peak(tiny):
    rows = {(r["part"], r["what"]): r for r in tiny[1]["rows"]}
    bf16, fp8 = rows[ROWS[7]], rows[ROWS[8]]
    for row in (bf16, fp8):
        assert positive(row["peak_gib"])
        assert row["note"].startswith("remat none (first that fits)")  # the CPU states no memory limit
    assert fp8["peak_gib"] < bf16["peak_gib"]  # 8-bit kernels
    assert rows[ROWS[9]]["peak_gib"] is None  # torch reports peak memory on CUDA only


def test_markdown_table_has_a_line_per_row(tiny):
    _, doc, text = tiny
    lines = text.strip().splitlines()
    table = lines[lines.index("") + 1:]
    assert table[0].startswith("| part | what | median ms |") and len(table) == 2 + len(ROWS)
    assert all(line.count("|") == 10 for line in table)
    assert [line.split(" | ")[1] for line in table[2:]] == [what for _, what in ROWS]


def test_unknown_part_is_refused_in_one_line(gpu_check, tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu_check.main(["--tiny", "--parts", "matmul,nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parts: unknown part 'nope'" in err[0]
    assert not out.exists()


def sized(policies):
    """lower(policy) for programs whose peak grows with the policy's size (float32 in and out)."""
    return lambda policy: jax.jit(lambda x: x * 2).lower(jnp.zeros(policies[policy], jnp.float32))


def test_first_fitting_remat_takes_the_first_policy_within_the_budget():
    lower = sized({"none": 4096, "dots": 1024, "full": 256})
    policy, compiled, peak = plan.first_fitting_remat(lower, 10_000)
    assert (policy, peak) == ("dots", plan.peak_bytes(compiled)) and 2 * 1024 * 4 <= peak <= 10_000
    assert plan.first_fitting_remat(lower, None)[0] == "none"  # no stated limit: the fastest policy
    with pytest.raises(GlanceError, match="the smallest, 'full', needs"):
        plan.first_fitting_remat(lower, 1000)
