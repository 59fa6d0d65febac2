"""`glance-jax plan`: what a full-size model needs per device, compiled from abstract shapes (no weights).

For a model, a resolution and a mesh, the real train step (LoRA on the
official preset) or the real sampling step is lowered with its shardings and
compiled for this machine's backend; XLA's memory analysis gives each device's
parameter and peak bytes, its cost analysis the FLOPs. On the CPU backend the
planner runs in a subprocess with one host device per mesh position and with
XLA's while-loop invariant code motion switched off: otherwise XLA's CPU
compiler (which has no bf16 matmul) converts every stacked bf16 weight to fp32
up front and reports memory no accelerator would use.

    glance-jax plan --model flux-dev --resolution 1024 --mesh fsdp=4 --task train
    glance-jax plan --model qwen-image --mesh data=2,fsdp=4 --task sample --json
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

from glance_jax import validation

MODELS = {"flux-dev": ("flux", 512), "flux-schnell": ("flux", 512), "qwen-image": ("qwen-image", 128)}
CPU_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def parser():
    p = validation.ArgumentParser(prog="glance-jax plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--resolution", type=int, default=1024, help="square image side in pixels")
    p.add_argument("--mesh", default="fsdp=1", help="e.g. fsdp=4 or data=2,fsdp=4 (axes data, fsdp, tensor)")
    p.add_argument("--task", default="train", choices=["train", "sample"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--remat", default="none", help="remat policy of the blocks: none, full, dots, dots_saveable")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense peak of the chip (H100: 989, v6e: 918)")
    p.add_argument("--target_seconds", type=float, default=None,
                   help="wanted time per train step or per Glance image: prints the MFU that needs")
    p.add_argument("--glance_steps", type=int, default=10, help="model evaluations (x2 with CFG) per Glance image")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    return p


def build(name, dtype, remat):
    import jax.numpy as jnp

    from glance_jax.models import FluxTransformer2DModel, QwenImageTransformer2DModel
    dt = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[dtype]
    if name == "qwen-image":
        return QwenImageTransformer2DModel(dtype=dt, param_dtype=dt, remat_policy=remat)
    return FluxTransformer2DModel(guidance_embeds=name == "flux-dev", dtype=dt, param_dtype=dt, remat_policy=remat)


def plan(args):
    """The planner's figures as a dict (runs in a process whose devices match the mesh)."""
    import jax
    import jax.numpy as jnp

    from glance_jax import analysis, sharding
    from glance_jax.lora import init_lora
    from glance_jax.recipes import official
    from glance_jax.train import make_train_step, optimizer

    family, text = MODELS[args.model]
    sizes = sharding.parse_mesh(args.mesh)
    n = math.prod(sizes.values())
    mesh = sharding.make_mesh(sizes, jax.devices()[:n])
    model = build(args.model, args.dtype, args.remat)
    tokens = (args.resolution // 16) ** 2
    sds = lambda tree, shardings: jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    param_sh = sharding.tree_shardings(params, mesh)
    batch = max(1, sizes.get("data", 1)) if args.task == "sample" else 1
    bf = model.dtype
    if family == "flux":
        cond = dict(encoder_hidden_states=jax.ShapeDtypeStruct((batch, text, 4096), bf),
                    pooled_projections=jax.ShapeDtypeStruct((batch, 768), bf),
                    img_ids=jax.ShapeDtypeStruct((tokens, 3), jnp.float32),
                    txt_ids=jax.ShapeDtypeStruct((text, 3), jnp.float32),
                    guidance=jax.ShapeDtypeStruct((batch,), jnp.float32) if model.guidance_embeds else None)
        static = ()
    else:
        side = args.resolution // 16
        cond = dict(encoder_hidden_states=jax.ShapeDtypeStruct((batch, text, 3584), bf),
                    encoder_hidden_states_mask=jax.ShapeDtypeStruct((batch, text), jnp.int32))
        static = (("img_shapes", ((1, side, side),) * batch),)
    cond_sh = jax.tree_util.tree_map(lambda x: sharding.batch_sharding(mesh, x.shape) if x.shape[0] == batch else
                                     sharding.replicated(mesh), cond)
    x_sds = jax.ShapeDtypeStruct((batch, tokens, 64), jnp.float32)
    rep = sharding.replicated(mesh)
    start = time.perf_counter()
    if args.task == "train":
        config = official(family, "slow")
        adapter = jax.eval_shape(lambda p: init_lora(jax.random.PRNGKey(0), p, family, config.lora.rank,
                                                     config.lora.alpha), params)
        opt = optimizer(config)
        opt_state = jax.eval_shape(opt.init, adapter)
        lora_sh, opt_sh = sharding.tree_shardings(adapter, mesh), sharding.tree_shardings(opt_state, mesh)
        batch_tree = {"x0": x_sds, "cond": cond}
        batch_sh = {"x0": sharding.batch_sharding(mesh, x_sds.shape), "cond": cond_sh}
        teacher = {"sigmas": jax.ShapeDtypeStruct((11,), jnp.float32),
                   "states": jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32)}
        teacher_sh = jax.tree_util.tree_map(lambda _: rep, teacher)
        points, key = jax.ShapeDtypeStruct((5,), jnp.int32), jax.eval_shape(lambda: jax.random.PRNGKey(0))
        in_sh = (lora_sh, opt_sh, param_sh, batch_sh, teacher_sh, rep, rep)
        out_sh = (lora_sh, opt_sh, {"loss": rep, "timestep": rep, "grad_norm": rep})
        step = make_train_step(model, config, static, (in_sh, out_sh))
        compiled = step.lower(adapter, opt_state, sds(params, param_sh), batch_tree, teacher, points, key).compile()
        counted = make_train_step(analysis.for_cost_analysis(model), config, static)
        flops = analysis.flops(counted, adapter, opt_state, params, batch_tree, teacher, points, key)
        trainable = sharding.bytes_per_device(adapter, lora_sh) + sharding.bytes_per_device(opt_state, opt_sh)
        passes = 1
    else:
        passes = 2 if family == "qwen-image" else 1  # Qwen-Image samples with true CFG: two passes a step

        def step(p, x, conds):
            v = sum(model.apply({"params": p}, hidden_states=x, timestep=jnp.ones((batch,)), **dict(static), **c)
                    for c in [conds] * passes)
            return x + 0.1 * v.astype(x.dtype)

        lowered = jax.jit(step, in_shardings=(param_sh, sharding.batch_sharding(mesh, x_sds.shape), cond_sh),
                          out_shardings=sharding.batch_sharding(mesh, x_sds.shape))
        compiled = lowered.lower(sds(params, param_sh), x_sds, cond).compile()
        counted = analysis.for_cost_analysis(model)
        flops = passes * analysis.flops(lambda p, x, c: counted.apply(
            {"params": p}, hidden_states=x, timestep=jnp.ones((batch,)), **dict(static), **c), params, x_sds, cond)
        trainable = 0
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)
    per_image = flops / batch * args.glance_steps if args.task == "sample" else None
    result = {"model": args.model, "task": args.task, "resolution": args.resolution, "mesh": sizes,
              "devices": n, "dtype": args.dtype, "remat": args.remat, "backend": jax.default_backend(),
              "params_bytes_per_device": sharding.bytes_per_device(params, param_sh),
              "trainable_bytes_per_device": trainable, "peak_bytes_per_device": int(peak),
              "flops_per_step": flops, "flops_per_glance_image": per_image, "compile_seconds": compile_s,
              "peak_tflops": args.peak_tflops,
              "seconds_per_step_at_peak": flops / (n * args.peak_tflops * 1e12)}
    if per_image is not None:
        result["seconds_per_glance_image_at_peak"] = per_image * batch / (n * args.peak_tflops * 1e12) / batch
    if args.target_seconds:
        work = per_image if per_image is not None else flops
        result["mfu_needed"] = work / (args.target_seconds * n * args.peak_tflops * 1e12)
    return result


def table(r):
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    rows = [("model / task", f"{r['model']} / {r['task']} at {r['resolution']}x{r['resolution']}, {r['dtype']}, "
                             f"remat {r['remat']}"),
            ("mesh", f"{r['mesh']} ({r['devices']} devices, {r['backend']} compile)"),
            ("parameters per device", gib(r["params_bytes_per_device"])),
            ("LoRA + Adam per device", gib(r["trainable_bytes_per_device"])),
            ("peak per device (XLA)", gib(r["peak_bytes_per_device"])),
            ("FLOPs per step", f"{r['flops_per_step'] / 1e12:.1f} TFLOP"),
            ("at peak", f"{r['seconds_per_step_at_peak']:.3f} s a step on {r['devices']} x "
                        f"{r['peak_tflops']:g} TFLOP/s")]
    if r["flops_per_glance_image"]:
        rows.append(("FLOPs per Glance image", f"{r['flops_per_glance_image'] / 1e12:.1f} TFLOP "
                                               f"(>= {r['seconds_per_glance_image_at_peak']:.2f} s)"))
    if "mfu_needed" in r:
        rows.append(("MFU needed", f"{100 * r['mfu_needed']:.1f}%"))
    return "\n".join(f"  {k:<24}{v}" for k, v in rows)


def check_args(args):
    """The planner's arguments, checked before anything is compiled (one GlanceError line each)."""
    validation.multiple_of("--resolution", args.resolution, 16)  # VAE factor 8 x 2 x 2 token patches
    validation.one_of("--remat", args.remat, validation.remat_policies())
    validation.positive_number("--peak_tflops", args.peak_tflops)
    validation.positive_int("--glance_steps", args.glance_steps)
    if args.target_seconds is not None:
        validation.positive_number("--target_seconds", args.target_seconds)


def main(argv):
    args = parser().parse_args(argv)
    check_args(args)
    from glance_jax import sharding
    n = math.prod(sharding.parse_mesh(args.mesh).values())
    if os.environ.get("GLANCE_PLAN_CHILD") != "1":
        import jax
        if jax.default_backend() == "cpu":  # compile in a child with one host device per mesh position
            env = dict(os.environ, GLANCE_PLAN_CHILD="1",
                       XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {CPU_FLAGS} "
                                 f"--xla_force_host_platform_device_count={n}")
            out = subprocess.run([sys.executable, "-m", "glance_jax.plan", *argv], env=env)
            if out.returncode:
                from glance_jax.errors import GlanceError
                raise GlanceError(f"the planner failed (exit {out.returncode})")
            return
    result = plan(args)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main(sys.argv[1:])
