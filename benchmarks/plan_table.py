"""The planner's table for the README: FLUX.1-dev and Qwen-Image, training and sampling at 1024 x 1024 in
bf16, on 1, 4 and 8 devices (fsdp), with the bf16 FLOPs per Glance image and the physical lower bound of
seconds per image on an H100 (989 TFLOP/s dense bf16) and a TPU v6e (918 TFLOP/s).

    python benchmarks/plan_table.py   # about 8 minutes on 2 CPU cores
"""

import json
import os
import subprocess
import sys

RUNS = [(model, task, devices, remat) for model in ("flux-dev", "qwen-image") for task in ("train", "sample")
        for devices in (1, 4, 8) for remat in (("none", "full") if task == "train" else ("none",))]


def plan(model, task, devices, remat):
    out = subprocess.run([sys.executable, "-m", "glance_jax.cli", "plan", "--model", model, "--task", task,
                          "--mesh", f"fsdp={devices}", "--remat", remat, "--json"], capture_output=True, text=True,
                         env=dict(os.environ), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    gib = lambda b: f"{b / 2 ** 30:.1f}"
    print("| model | task | remat | devices | params / device GiB | peak / device GiB | TFLOP / step | "
          "TFLOP / Glance image | H100 s / image (bound) | v6e s / image (bound) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, task, devices, remat in RUNS:
        r = plan(model, task, devices, remat)
        image = r["flops_per_glance_image"]
        bound = lambda peak: f"{image / (devices * peak * 1e12):.3f}" if image else "-"
        print(f"| {model} | {task} | {remat} | {devices} | {gib(r['params_bytes_per_device'])} | "
              f"{gib(r['peak_bytes_per_device'])} | {r['flops_per_step'] / 1e12:.1f} | "
              f"{image / 1e12:.0f} | {bound(989)} | {bound(918)} | {r['compile_seconds']:.0f} |"
              if image else
              f"| {model} | {task} | {remat} | {devices} | {gib(r['params_bytes_per_device'])} | "
              f"{gib(r['peak_bytes_per_device'])} | {r['flops_per_step'] / 1e12:.1f} | - | - | - | "
              f"{r['compile_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
