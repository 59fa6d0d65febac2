"""`glance-jax plan`: what a full-size model needs per device, compiled from abstract shapes (no weights).

For a model, a resolution and a mesh, the real train step (LoRA on the
official preset) or the real sampling step is lowered with its shardings and
compiled for this machine's backend; XLA's memory analysis gives each device's
parameter and peak bytes, its cost analysis the FLOPs. On the CPU backend the
planner runs in a subprocess with one host device per mesh position and with
XLA's while-loop invariant code motion switched off: otherwise XLA's CPU
compiler (which has no bf16 matmul) converts every stacked bf16 weight to fp32
up front and reports memory no accelerator would use.

With `--target` a TPU slice (v5e-8, v6e-4, ...), the same program is
compiled ahead of time by XLA's TPU compiler through `libtpu` (no TPU needed:
the slice's chips come from `jax.experimental.topologies`), with the mesh over
its chips. The figures are then the TPU's own: per-chip HBM peak against the
chip's HBM (a program that does not fit is the compiler's refusal, reported as
"does not fit: needs X of Y GiB"), and the compiler's roofline estimate of
the step's time (`optimal_seconds`, when it gives one) beside the FLOP bound.
"auto" attention is then Pallas splash attention (never materialises the
logits). `--target h100`
compiles for one H100 the same way, through the CUDA PJRT plugin and a target
description (no GPU or driver needed; `glance_jax[gpu-plan]`), with cuDNN's
flash attention; XLA's GPU compiler gives memory but no time estimate.

    glance-jax plan --model flux-dev --resolution 1024 --mesh fsdp=4 --task train
    glance-jax plan --model qwen-image --mesh data=2,fsdp=4 --task sample --json
    glance-jax plan --target v5e-8 --model flux-dev --task train          # needs glance_jax[tpu-plan]
"""

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from glance_jax import analysis, families, quantize, sharding, validation
from glance_jax.errors import GlanceError
from glance_jax.lora import init_lora
from glance_jax.modules import attention, layers
from glance_jax.pipelines import euler_step
from glance_jax.train import default_config
from glance_jax.train_step import make_train_step, optimizer

CPU_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
# TPU slices: (topology name, chips per host, HBM per chip that XLA's TPU compiler allows (GiB, from its
# out-of-memory message), dense bf16 TFLOP/s per chip). v5p-8 counts TensorCores: 4 chips of 2 cores each.
TARGETS = {
    "v5e-1": ("v5e:1x1", (1, 1, 1), 15.75, 197.0), "v5e-4": ("v5e:2x2", (2, 2, 1), 15.75, 197.0),
    "v5e-8": ("v5e:2x4", (2, 4, 1), 15.75, 197.0),
    "v6e-1": ("v6e:1x1", (1, 1, 1), 31.25, 918.0), "v6e-4": ("v6e:2x2", (2, 2, 1), 31.25, 918.0),
    "v6e-8": ("v6e:2x4", (2, 4, 1), 31.25, 918.0),
    "v5p-8": ("v5p:2x2x1", (2, 2, 1), 95.74, 459.0),
}
# GPUs, compiled without a GPU through the CUDA PJRT plugin and a target description (XLA's GpuTargetConfig:
# an H100 SXM's limits, its 80 GB (79.1 GiB) of HBM, CUDA 12.8, cuDNN 9): (description, dense bf16 TFLOP/s).
H100_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 7 } runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGETS = {"h100": (H100_CONFIG, 84929347584, 989.0)}
DEFAULT_PEAK_TFLOPS = GPU_TARGETS["h100"][2]  # the cpu target's: it stands for no chip, so assume an H100
OOM = re.compile(r"required for [^(]*\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def parser():
    p = validation.ArgumentParser(prog="glance-jax plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(families.VARIANTS))
    p.add_argument("--resolution", type=int, default=1024, help="square image side in pixels")
    p.add_argument("--target", default="cpu", choices=["cpu", *TARGETS, *GPU_TARGETS],
                   help="cpu (this machine's compiler), a TPU slice (through libtpu) or h100 (CUDA plugin)")
    p.add_argument("--mesh", default=None,
                   help="e.g. fsdp=4 or data=2,fsdp=4 (axes data, fsdp, tensor); default fsdp over all chips")
    p.add_argument("--task", default="train", choices=["train", "sample"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--remat", default="none", help="remat policy of the blocks: none, full, dots, dots_saveable")
    p.add_argument("--quantize", default="none", choices=["none", "fp8", "int8"],
                   help="frozen base with 8-bit Dense kernels (glance_jax.quantize), as the official training runs")
    p.add_argument("--state_dtype", default="fp32", choices=["fp32", "bf16"], help="Adam moments' dtype (train)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "blocked", "splash", "cudnn"],
                   help="attention kernel (auto: splash on TPU targets, blocked on cpu)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="dense peak of the chip (default: the target's; an H100's for cpu)")
    p.add_argument("--target_seconds", type=float, default=None,
                   help="wanted time per train step or per Glance image: prints the MFU that needs")
    p.add_argument("--glance_steps", type=int, default=10, help="model evaluations (x2 with CFG) per Glance image")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return p


def build(name, dtype, remat, attention="auto"):
    family, overrides = families.of_variant(name)
    dt = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]
    return family.transformer(**overrides, dtype=dt, param_dtype=dt, remat_policy=remat, attention_impl=attention)


def tpu_devices(target):
    """The chips of a TPU slice as compile-only devices (XLA's TPU compiler from libtpu; no TPU needed)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise GlanceError(f"--target {target} compiles with XLA's TPU compiler: install the libtpu extra "
                          "(pip install 'glance_jax[tpu-plan]')") from None
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes may hold libtpu's lock file
    from jax.experimental import topologies
    topology, per_host, _, _ = TARGETS[target]
    return topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=list(per_host)).devices


def gpu_devices(target):
    """One GPU as a compile-only device: XLA's GPU compiler from the CUDA PJRT plugin, no GPU or driver needed."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA runtime here: only the compiler is used
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                            target_config=GPU_TARGETS[target][0]).devices
    except NotImplementedError:
        raise GlanceError(f"--target {target} compiles with XLA's GPU compiler: install the gpu-plan extra "
                          "(pip install 'glance_jax[gpu-plan]')") from None


def compile_or_oom(lower):
    """`lower().compile()`, or None and the compiler's (needed, available) bytes when it does not fit in HBM."""
    try:
        return lower().compile(), None
    except jax.errors.JaxRuntimeError as e:
        found = OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        return None, tuple(float(x) * 2 ** 30 for x in found.groups())


def peak_bytes(compiled):
    """A compiled program's peak device memory by XLA's memory analysis: arguments + outputs + temporaries,
    less the outputs that reuse (donated) argument buffers."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)


REMAT_ORDER = ("none", "dots", "full")  # fastest first: each keeps fewer activations and recomputes more


def first_fitting_remat(lower, budget_bytes, policies=REMAT_ORDER):
    """`(policy, compiled, peak bytes)` for the first remat policy, fastest first, whose program fits
    `budget_bytes` (None: the first always fits): each is compiled in turn from `lower(policy)` (a
    `jax.jit(...).lower(...)`) and its peak read as the planner reads it. None fitting is a GlanceError
    naming the smallest need."""

    needs = {}
    for policy in policies:
        compiled, oom = compile_or_oom(lambda: lower(policy))
        needs[policy] = oom[0] if oom else peak_bytes(compiled)
        if compiled is not None and (budget_bytes is None or needs[policy] <= budget_bytes):
            return policy, compiled, needs[policy]
    policy = min(needs, key=needs.get)
    raise GlanceError(f"no remat policy fits {budget_bytes / 2 ** 30:.2f} GiB: the smallest, {policy!r}, "
                      f"needs {needs[policy] / 2 ** 30:.2f} GiB")


def plan(args, model=None):
    """The planner's figures as a dict. On the cpu target it runs in a process whose devices match the mesh;
    on a TPU target in any process (the default backend stays what it was). `model` replaces the full-size
    model (tests plan tiny ones)."""
    tpu, gpu = args.target in TARGETS, args.target in GPU_TARGETS
    devices = tpu_devices(args.target) if tpu else gpu_devices(args.target) if gpu else jax.devices()
    sizes = sharding.parse_mesh(args.mesh or f"fsdp={len(devices)}")
    n = math.prod(sizes.values())
    if (tpu or gpu) and n != len(devices):
        raise GlanceError(f"mesh {args.mesh} has {n} positions, {args.target} has {len(devices)} chips")
    mesh = sharding.make_mesh(sizes, devices[:n])
    peak_tflops = args.peak_tflops or (TARGETS[args.target][3] if tpu else GPU_TARGETS[args.target][2] if gpu
                                       else DEFAULT_PEAK_TFLOPS)
    platform = "tpu" if tpu else "gpu" if gpu else jax.default_backend()
    model = model or build(args.model, args.dtype, args.remat, args.attention)
    within = lambda: _context(mesh, attention.compiling_for(platform)) if tpu or gpu else contextlib.ExitStack()
    with within():
        impl = attention.resolve(model.attention_impl)
    program = step_program(model, args, mesh)
    start = time.perf_counter()
    with within():
        compiled, oom = compile_or_oom(program["lower"])
    compile_s = time.perf_counter() - start
    flops, batch = program["flops"](), program["batch"]
    hbm = int(TARGETS[args.target][2] * 2 ** 30) if tpu else GPU_TARGETS[args.target][1] if gpu else None
    if oom:
        peak, hbm = oom
    else:
        peak = peak_bytes(compiled)
    optimal = seen_flops = None
    if tpu:
        optimal, seen_flops = compiler_estimate(model, args, mesh, within)
        if optimal is not None and impl == "splash":  # Pallas kernels carry no cost estimate: add at peak
            optimal += max(0.0, flops / n - seen_flops) / (peak_tflops * 1e12)
    per_image = flops / batch * args.glance_steps if args.task == "sample" else None
    result = {"model": args.model, "task": args.task, "resolution": args.resolution, "mesh": sizes,
              "devices": n, "dtype": args.dtype, "remat": args.remat, "quantize": args.quantize,
              "state_dtype": args.state_dtype,
              "backend": platform,
              "target": args.target, "attention": impl,
              "hbm_bytes_per_chip": hbm, "fits": None if hbm is None else bool(peak <= hbm),
              "params_bytes_per_device": program["params_bytes"], "trainable_bytes_per_device": program["trainable"],
              "peak_bytes_per_device": int(peak),
              "flops_per_step": flops, "flops_per_glance_image": per_image, "compile_seconds": compile_s,
              "peak_tflops": peak_tflops,
              "seconds_per_step_at_peak": flops / (n * peak_tflops * 1e12),
              "optimal_seconds_per_step": optimal, "compiler_flops_per_device": seen_flops}
    if per_image is not None:
        result["seconds_per_glance_image_at_peak"] = per_image * batch / (n * peak_tflops * 1e12) / batch
        result["optimal_seconds_per_glance_image"] = None if optimal is None else optimal * args.glance_steps / batch
    if args.target_seconds:
        work = per_image if per_image is not None else flops
        result["mfu_needed"] = work / (args.target_seconds * n * peak_tflops * 1e12)
    return result


def step_program(model, args, mesh):
    """The real train or sampling step of `model` on `mesh`, from abstract shapes: a dict with `lower` (-> the
    jit-lowered program), `flops` (-> XLA's FLOP count of the step, every block counted), the sampling `batch`,
    and the per-device bytes of the parameters and of the LoRA + Adam state."""
    family = families.of_variant(args.model)[0]  # an editing variant shares its transformer class
    text = family.plan_text_tokens
    sizes = dict(mesh.shape)
    sds = lambda tree, shardings: jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    if args.quantize != "none":
        params = quantize.abstract(params, args.quantize)
    param_sh = sharding.tree_shardings(params, mesh)
    batch = max(1, sizes.get("data", 1)) if args.task == "sample" else 1
    side = args.resolution // family.vae_scale_factor
    x_sds = jax.eval_shape(family.pack_latents, jax.ShapeDtypeStruct(
        (batch, side, side, family.latent_channels(model)), jnp.float32))
    rows, cols = family.token_grid(x_sds.shape[:1] + (side, side, 1))
    encodings = family.example_encodings(model, batch, text)
    if family.reference_images:  # an edit: one source image of the target's size, its tokens beside the image's
        encodings["image_latents"] = (jnp.zeros((batch, side, side, family.latent_channels(model)), model.dtype),)
    _, static = family.conditioning(model, encodings, rows, cols)
    cond = jax.eval_shape(lambda e: family.conditioning(model, e, rows, cols)[0], encodings)
    cond_sh = jax.tree_util.tree_map(lambda x: sharding.batch_sharding(mesh, x.shape) if x.shape[0] == batch else
                                     sharding.replicated(mesh), cond)
    rep = sharding.replicated(mesh)
    program = {"batch": batch, "params_bytes": sharding.bytes_per_device(params, param_sh), "trainable": 0}
    if args.task == "train":
        config = default_config(family.name, "slow")
        config.optim.state_dtype = args.state_dtype
        adapter = jax.eval_shape(lambda p: init_lora(jax.random.PRNGKey(0), p, family.name, config.lora.rank,
                                                     config.lora.alpha), params)
        opt = optimizer(config.optim)
        opt_state = jax.eval_shape(opt.init, adapter)
        lora_sh, opt_sh = sharding.tree_shardings(adapter, mesh), sharding.tree_shardings(opt_state, mesh)
        batch_tree = {"x0": x_sds, "cond": cond}
        batch_sh = {"x0": sharding.batch_sharding(mesh, x_sds.shape), "cond": cond_sh}
        # as the run passes them: the official 10 points and 0, padded to 16; `points` masks the phase's among them
        teacher = {"sigmas": jax.ShapeDtypeStruct((16,), jnp.float32),
                   "states": jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32)}
        teacher_sh = jax.tree_util.tree_map(lambda _: rep, teacher)
        points, key = jax.ShapeDtypeStruct((16,), jnp.float32), jax.eval_shape(lambda: jax.random.PRNGKey(0))
        in_sh = (lora_sh, opt_sh, param_sh, batch_sh, teacher_sh, rep, rep)
        out_sh = (lora_sh, opt_sh, {"loss": rep, "timestep": rep, "grad_norm": rep})
        step = make_train_step(model, config, static, (in_sh, out_sh))
        program["lower"] = lambda: step.lower(adapter, opt_state, sds(params, param_sh), batch_tree, teacher, points,
                                              key)
        counted = make_train_step(analysis.for_cost_analysis(model), config, static)
        program["flops"] = lambda: analysis.flops(counted, adapter, opt_state, params, batch_tree, teacher, points,
                                                  key)
        program["trainable"] = (sharding.bytes_per_device(adapter, lora_sh)
                                + sharding.bytes_per_device(opt_state, opt_sh))
    else:  # one Euler step of the sampler; true CFG (Qwen-Image): two passes over caption and negative prompt
        conds = [cond] * (1 if family.guidance_input else 2)

        def step(p, x, conds):
            return euler_step(model, static, {"params": p}, x, 1.0, -0.1, conds, 4.0, family.cfg_rescale)

        x_sh = sharding.batch_sharding(mesh, x_sds.shape)
        jitted = jax.jit(step, in_shardings=(param_sh, x_sh, [cond_sh] * len(conds)),
                         out_shardings=sharding.batch_sharding(mesh, x_sds.shape))
        program["lower"] = lambda: jitted.lower(sds(params, param_sh), x_sds, conds)
        counted = analysis.for_cost_analysis(model)
        program["flops"] = lambda: analysis.flops(
            lambda p, x, c: euler_step(counted, static, {"params": p}, x, 1.0, -0.1, c, 4.0, family.cfg_rescale),
            params, x_sds, conds)
    return program


def compiler_estimate(model, args, mesh, within):
    """The TPU compiler's `optimal_seconds` and FLOPs per device for the whole step.

    The estimate is None when two blocks do not fit a chip, or when the
    compiler could not cost some operation: its cost analysis then adds -1
    for each, and the sum is negative (it is, in this libtpu, for most
    programs with more than one block).

    XLA's cost analysis counts a loop's body once, so it is read from small
    unrolled copies of the model: one block per stack, then two blocks in one
    stack at a time; each extra block adds the difference (the blocks of a
    stack are the same program)."""
    stacks = [name for name in ("num_layers", "num_single_layers") if getattr(model, name, 0)]

    def cost(**layers):
        program = step_program(model.clone(scan_unroll=True, **{name: 1 for name in stacks} | layers), args, mesh)
        with within():
            compiled, oom = compile_or_oom(program["lower"])
        if oom:
            return None
        found = compiled_cost(compiled)
        return np.array([found["optimal_seconds"], found["flops"]])

    one = cost()
    more = [cost(**{name: 2}) for name in stacks] if one is not None else []
    if one is None or any(m is None for m in more):
        return None, None  # not even two blocks fit a chip
    total = one + sum((getattr(model, name) - 1) * (m - one) for name, m in zip(stacks, more))
    if min(p[0] for p in [one, *more]) < 0:  # -1 for each op it cannot cost: no estimate
        return None, float(total[1])
    return float(total[0]), float(total[1])


@contextlib.contextmanager
def _context(mesh, compiling_for):
    """The mesh as JAX's context mesh (splash attention's `shard_map` reads it) and "auto" meaning the target's
    kernels."""
    with jax.set_mesh(mesh), compiling_for:
        yield


def compiled_cost(compiled):
    """The compiled program's cost analysis as one dict (per device: FLOPs, bytes, the TPU's `optimal_seconds`)."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def table(r):
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    rows = [("model / task", f"{r['model']} / {r['task']} at {r['resolution']}x{r['resolution']}, {r['dtype']}, "
                             f"remat {r['remat']}, quantize {r['quantize']}"),
            ("target", f"{r['target']}: mesh {r['mesh']} ({r['devices']} devices, {r['backend']} compile), "
                       f"{r['attention']} attention"),
            ("parameters per device", gib(r["params_bytes_per_device"])),
            ("LoRA + Adam per device", gib(r["trainable_bytes_per_device"])),
            ("peak per device (XLA)", gib(r["peak_bytes_per_device"]))]
    if r["fits"] is not None:
        rows.append(("fits", fit_line(r)))
    rows += [
            ("FLOPs per step", f"{r['flops_per_step'] / 1e12:.1f} TFLOP"),
            ("at peak", f"{r['seconds_per_step_at_peak']:.3f} s a step on {r['devices']} x "
                        f"{r['peak_tflops']:g} TFLOP/s")]
    if r["optimal_seconds_per_step"] is not None:
        rows.append(("compiler's estimate", f"{r['optimal_seconds_per_step']:.3f} s a step (optimal_seconds)"))
    if r["flops_per_glance_image"]:
        rows.append(("FLOPs per Glance image", f"{r['flops_per_glance_image'] / 1e12:.1f} TFLOP "
                                               f"(>= {r['seconds_per_glance_image_at_peak']:.2f} s)"))
        if r.get("optimal_seconds_per_glance_image") is not None:
            rows.append(("Glance image, compiler", f"{r['optimal_seconds_per_glance_image']:.2f} s"))
    if "mfu_needed" in r:
        rows.append(("MFU needed", f"{100 * r['mfu_needed']:.1f}%"))
    return "\n".join(f"  {k:<24}{v}" for k, v in rows)


def fit_line(r):
    """"fits (X of Y GiB)" or "does not fit: needs X of Y GiB" for a TPU plan."""
    need, have = r["peak_bytes_per_device"] / 2 ** 30, r["hbm_bytes_per_chip"] / 2 ** 30
    return f"fits ({need:.2f} of {have:.2f} GiB)" if r["fits"] else f"does not fit: needs {need:.2f} of {have:.2f} GiB"


def check_args(args):
    """The planner's arguments, checked before anything is compiled (one GlanceError line each)."""
    validation.multiple_of("--resolution", args.resolution, 16)  # VAE factor 8 x 2 x 2 token patches
    validation.one_of("--remat", args.remat, tuple(layers.REMAT_POLICIES))
    if args.peak_tflops is not None:  # default: the target's own
        validation.positive_number("--peak_tflops", args.peak_tflops)
    validation.positive_int("--glance_steps", args.glance_steps)
    if args.target_seconds is not None:
        validation.positive_number("--target_seconds", args.target_seconds)


def main(argv):
    args = parser().parse_args(argv)
    check_args(args)
    n = math.prod(sharding.parse_mesh(args.mesh or "fsdp=1").values())
    if args.target == "cpu" and os.environ.get("GLANCE_PLAN_CHILD") != "1":
        if jax.default_backend() == "cpu":  # compile in a child with one host device per mesh position
            env = dict(os.environ, GLANCE_PLAN_CHILD="1",
                       XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {CPU_FLAGS} "
                                 f"--xla_force_host_platform_device_count={n}")
            out = subprocess.run([sys.executable, "-m", "glance_jax.plan", *argv], env=env)
            if out.returncode:
                raise GlanceError(f"the planner failed (exit {out.returncode})")
            return
    result = plan(args)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main(sys.argv[1:])
