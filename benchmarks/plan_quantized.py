"""Per-device memory of the full train step with a bf16, fp8 or int8 frozen base, from the planner.

FLUX.1-dev and Qwen-Image at 1024 x 1024 on one device, the official LoRA preset, rank and AdamW (fp32
moments, and bf16 moments for the quantized rows with full remat), for the remat policies none, dots and
full; the editing models (FLUX.1 Kontext, Qwen-Image-Edit) with one 1024 x 1024 source image, bf16 and fp8,
dots and full. Each row is one `glance-jax plan` run (a full-size compile from abstract shapes, ~30 s and
several GB on this machine's CPU backend), run one at a time.

    python benchmarks/plan_quantized.py                          # about 25 minutes on 2 CPU cores
    python benchmarks/plan_quantized.py fp8,int8                 # only the quantized rows
    python benchmarks/plan_quantized.py none,fp8 flux-kontext,qwen-image-edit   # only these models
"""

import json
import os
import subprocess
import sys

MODELS = ("flux-dev", "qwen-image")
RUNS = ([(model, remat, quantize, "fp32") for model in MODELS for quantize in ("none", "fp8", "int8")
         for remat in ("none", "dots", "full")]
        + [(model, "full", quantize, "bf16") for model in MODELS for quantize in ("fp8", "int8")]
        + [(model, remat, quantize, "fp32") for model in ("flux-kontext", "qwen-image-edit")
           for quantize in ("none", "fp8") for remat in ("dots", "full")])


def plan(model, remat, quantize, state_dtype):
    out = subprocess.run([sys.executable, "-m", "glance_jax.cli", "plan", "--model", model, "--task", "train",
                          "--mesh", "fsdp=1", "--remat", remat, "--quantize", quantize, "--state_dtype", state_dtype,
                          "--json"], capture_output=True, text=True, env=dict(os.environ), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    bases = sys.argv[1].split(",") if len(sys.argv) > 1 else ("none", "fp8", "int8")
    models = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    gib = lambda b: f"{b / 2 ** 30:.1f}"
    print("| model | base | remat | Adam moments | params / device GiB | LoRA + Adam GiB | peak / device GiB | "
          "TFLOP / step | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, remat, quantize, state_dtype in RUNS:
        if quantize not in bases or (models and model not in models):
            continue
        r = plan(model, remat, quantize, state_dtype)
        base = "bf16" if quantize == "none" else quantize
        print(f"| {model} | {base} | {remat} | {state_dtype} | {gib(r['params_bytes_per_device'])} | "
              f"{r['trainable_bytes_per_device'] / 2 ** 30:.2f} | {gib(r['peak_bytes_per_device'])} | "
              f"{r['flops_per_step'] / 1e12:.1f} | {r['compile_seconds']:.0f} |", flush=True)
        print(json.dumps({"benchmark": "plan_quantized", **r}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
