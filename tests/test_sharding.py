"""Meshes and multi-host runs, checked in subprocesses (8 host CPU devices; two processes under
jax.distributed with gloo): the same LoRA and latents as one device, parameters split over fsdp."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from diffusers import FluxTransformer2DModel as TorchFlux
from sklearn.datasets import load_sample_images

from glance_jax import sharding
from glance_jax.checkpoints import safetensors_io
from glance_jax.errors import GlanceError
from torch_peers import randomize_

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=[4, 6, 6])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("multidevice")
    randomize_(TorchFlux(**CONFIG), seed=0).save_pretrained(work / "base")
    (work / "sample").mkdir()
    shutil.copy(load_sample_images().filenames[0], work / "sample" / "china.jpg")
    (work / "sample" / "china.txt").write_text("a temple")
    rng = np.random.default_rng(0)
    safetensors_io.save_file({"latents": rng.standard_normal((20, 32, 16), dtype=np.float32),
                              "prompt_embeds": rng.standard_normal((6, 24), dtype=np.float32),
                              "pooled_prompt_embeds": rng.standard_normal((20,), dtype=np.float32)},
                             work / "sample" / "china.safetensors")
    return work


def run(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, os.path.join(HERE, "multidevice.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def last_json(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_sharded_training_and_sampling_match_one_device(work):
    out, err = run(["mesh", work]).communicate(timeout=900)
    assert "{" in out, err[-3000:]
    result = last_json(out)
    print(result)
    assert result["devices"] == 8
    assert result["lora_max_diff"] <= 1e-5 * max(1.0, result["lora_max"])  # 5 steps, data=2 x fsdp=4
    assert result["sampler_max_diff"] <= 1e-5 and "data" in result["latents_spec"]
    assert "fsdp" in result["kernel_spec"]
    assert result["bytes_per_device"] <= 0.3 * result["bytes_total"]  # about total / 4 (small leaves whole)


def test_two_processes_train_save_and_restore(work):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [run(["process", i, 2, port, work]) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = sorted((last_json(out) for out, _ in outs), key=lambda r: r["process"])
    assert [r["process"] for r in results] == [0, 1] and all(r["devices"] == 2 for r in results)
    assert results[0]["lora_written"]
    steps = [json.loads(line)["step"] for line in (work / "multiprocess" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer; the second run resumed from the step-2 checkpoint


def test_mesh_specs_and_errors():
    import jax
    mesh = sharding.make_mesh({})
    assert sharding.parse_mesh("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    with pytest.raises(GlanceError, match="axis=size"):
        sharding.parse_mesh("model=2")
    with pytest.raises(GlanceError, match="needs 4 devices"):
        sharding.make_mesh("fsdp=4", devices=jax.devices()[:1])
    assert sharding.logical_axes(("transformer_blocks", "attn", "to_q", "kernel"), 3) == ("layers", "in", "out")
    assert sharding.logical_axes(("x_embedder", "A"), 2) == ("in", "rank")
    assert sharding.spec(("in", "out"), (6, 8), mesh) == sharding.PartitionSpec(None, None)


def test_planner_runs_for_the_full_size_models():
    """Compiles the real steps of FLUX.1-dev, FLUX.1-schnell and Qwen-Image from abstract shapes (the time is
    printed, not asserted: tests check correctness, benchmarks time)."""
    import time
    for model, task, mesh in (("flux-dev", "train", "fsdp=4"), ("flux-schnell", "sample", "fsdp=2"),
                              ("qwen-image", "sample", "data=2,fsdp=2")):
        start = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-m", "glance_jax.cli", "plan", "--model", model, "--task", task,
                              "--mesh", mesh, "--json", "--target_seconds", "2"], capture_output=True, text=True,
                             env=env)
        seconds = time.perf_counter() - start
        assert out.returncode == 0, out.stderr[-2000:]
        r = last_json(out.stdout)
        print(model, task, mesh, f"{seconds:.0f} s", {k: r[k] for k in ("params_bytes_per_device",
                                                                      "peak_bytes_per_device", "flops_per_step")})
        assert r["peak_bytes_per_device"] > r["params_bytes_per_device"] > 0 and r["flops_per_step"] > 1e13
        assert 0 < r["mfu_needed"] < 1
        if model == "flux-dev":  # 11.9 B bf16 parameters split four ways
            assert abs(r["params_bytes_per_device"] / 2 ** 30 - 22.2 / 4) < 0.2
