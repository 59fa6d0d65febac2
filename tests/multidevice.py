"""Checks that need several devices, run in a subprocess (8 host CPU devices, or one of two processes).

    python tests/multidevice.py mesh WORK         # sharded train step, sampler and parameter bytes; prints JSON
    python tests/multidevice.py process I N PORT WORK   # process I of N under jax.distributed
"""

import json
import os
import sys

if sys.argv[1] == "mesh":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

if sys.argv[1] == "process":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[4]}", num_processes=int(sys.argv[3]),
                               process_id=int(sys.argv[2]))

import numpy as np  # noqa: E402

from glance_jax import sharding  # noqa: E402
from glance_jax.checkpoints import safetensors_io  # noqa: E402
from glance_jax.models import FluxTransformer2DModel  # noqa: E402
from glance_jax.pipelines import FluxGlancePipeline  # noqa: E402
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER  # noqa: E402
from glance_jax.schedules import GlanceSchedule  # noqa: E402
from glance_jax.train import default_config, prepare, train_phases  # noqa: E402


def config(work, mesh, steps=5, every=5):
    c = default_config("flux", "slow")
    c.model.path, c.model.dtype = os.path.join(work, "base"), "fp32"
    c.data.dir, c.data.resolution, c.data.cache_dir = os.path.join(work, "sample"), 256, os.path.join(work, "cache")
    c.lora.rank, c.lora.alpha = 4, 16.0
    c.steps, c.checkpoint.every, c.mesh = steps, every, mesh
    return c


def lora_file(workdir):
    f = safetensors_io.SafetensorsFile(os.path.join(workdir, "slow_lora.safetensors"))
    return {k: f.read(k) for k in f.keys()}


def max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def mesh_checks(work):
    one = lora_file(os.path.dirname(train_phases(prepare(config(work, ""), os.path.join(work, "one")))["slow"]))
    sharded_run = prepare(config(work, "data=2,fsdp=4"), os.path.join(work, "sharded"))
    spec = str(sharded_run.params["transformer_blocks"]["attn"]["to_q"]["kernel"].sharding.spec)
    sharded = lora_file(os.path.dirname(train_phases(sharded_run)["slow"]))
    params = sharded_run.params
    per_device = sharding.bytes_per_device(params, jax.tree_util.tree_map(lambda x: x.sharding, params))
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))

    mesh = sharding.make_mesh("data=2,fsdp=4")
    model, p1 = FluxTransformer2DModel.from_pretrained(os.path.join(work, "base"))
    _, p8 = FluxTransformer2DModel.from_pretrained(os.path.join(work, "base"), mesh=mesh)
    rng = np.random.default_rng(0)
    inputs = dict(prompt_embeds=rng.standard_normal((2, 6, 24), dtype=np.float32),
                  pooled_prompt_embeds=rng.standard_normal((2, 20), dtype=np.float32), height=64, width=96,
                  seed=[1, 2], schedule=GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=24))
    single = np.asarray(FluxGlancePipeline(model, p1, FLUX_SCHEDULER)(**inputs))
    spread = FluxGlancePipeline(model, p8, FLUX_SCHEDULER, mesh=mesh)(**inputs)
    print(json.dumps({"lora_max_diff": max_diff(one, sharded), "lora_max": max(float(np.abs(v).max()) for v in
                                                                                 one.values()),
                      "kernel_spec": spec, "bytes_per_device": per_device, "bytes_total": total,
                      "sampler_max_diff": float(np.max(np.abs(single - np.asarray(spread)))),
                      "latents_spec": str(spread.sharding.spec), "devices": jax.device_count()}))


def process_checks(work):
    workdir = os.path.join(work, "multiprocess")
    train_phases(prepare(config(work, "fsdp=2", steps=2, every=2), workdir))  # writes a checkpoint at step 2
    run = prepare(config(work, "fsdp=2", steps=4, every=2), workdir)    # restores it and goes on
    train_phases(run)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "lora_written": os.path.exists(
                          os.path.join(workdir, "slow_lora.safetensors"))}))


if __name__ == "__main__":
    if sys.argv[1] == "mesh":
        mesh_checks(sys.argv[2])
    else:
        process_checks(sys.argv[5])
