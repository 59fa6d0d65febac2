"""The planner's table for the README, from XLA's TPU compiler (libtpu, no TPU needed): FLUX.1-dev and
Qwen-Image at 1024 x 1024 in bf16, the LoRA train step (official presets) and one sampling step (Qwen-Image
with its two CFG passes), on TPU v5e-8, v6e-4 and v5p-8 (fsdp over all chips), remat none / dots / full,
XLA's attention against splash attention.

Each plan runs in its own process (one at a time: a full-size TPU compile takes minutes and GBs here) and is
cached in `plan_table.json` beside this script; the table is printed from that file, the most informative
rows first, so an interrupted run still gives a table and a rerun only compiles what is missing.

    python benchmarks/plan_table.py            # compile what is missing (hours on 2 CPU cores), then print
    python benchmarks/plan_table.py --print    # print the table from plan_table.json only
"""

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "plan_table.json")

# (model, task, target, remat, attention), most informative first.
FIRST = [("flux-dev", "train", "v5e-8", "none", "splash"), ("flux-dev", "sample", "v6e-4", "none", "splash"),
         ("flux-dev", "train", "v5e-8", "none", "xla"), ("flux-dev", "sample", "v6e-4", "none", "xla"),
         ("qwen-image", "sample", "v6e-4", "none", "splash"), ("qwen-image", "train", "v5e-8", "none", "splash"),
         ("flux-dev", "train", "v6e-4", "none", "splash"), ("qwen-image", "train", "v6e-4", "none", "splash")]
REST = [(model, task, target, remat, attention) for model in ("flux-dev", "qwen-image")
        for task in ("train", "sample") for target in ("v5e-8", "v6e-4", "v5p-8")
        for remat in (("none", "dots", "full") if task == "train" else ("none",)) for attention in ("splash", "xla")]
RUNS = FIRST + [run for run in REST if run not in FIRST]


def key(run):
    return "/".join(run)


def plan(model, task, target, remat, attention):
    """One plan in a child process: the JSON line of `glance-jax plan --json`, or the error it ended with."""
    start = time.perf_counter()
    out = subprocess.run(["nice", "-n", "5", sys.executable, "-m", "glance_jax.cli", "plan", "--model", model,
                          "--task", task, "--target", target, "--remat", remat, "--attention", attention, "--json"],
                         capture_output=True, text=True, env=dict(os.environ))
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    result["wall_seconds"] = time.perf_counter() - start
    return result


def seconds(value, digits):
    """A compiler estimate, or "n/a" where it gave none (a negative optimal_seconds: an op it could not cost)."""
    return "n/a" if value is None or value < 0 else f"{value:.{digits}f}"


def table(cache):
    gib = lambda b: f"{b / 2 ** 30:.2f}"
    rows = ["| model | task | target | remat | attention | peak / chip GiB | fits | TFLOP / step | "
            "compiler s / step | FLOP bound s / step | compiler s / Glance image | FLOP bound s / image | "
            "compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in RUNS:
        r = cache.get(key(run))
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {' | '.join(run)} | error: {r['error']} |" + " |" * 8)
            continue
        sample = r["task"] == "sample"
        fits = "yes" if r["fits"] else f"no (of {gib(r['hbm_bytes_per_chip'])})"
        rows.append(f"| {' | '.join(run)} | {gib(r['peak_bytes_per_device'])} | {fits} | "
                    f"{r['flops_per_step'] / 1e12:.1f} | {seconds(r['optimal_seconds_per_step'], 3)} | "
                    f"{r['seconds_per_step_at_peak']:.3f} | " +
                    (f"{seconds(r['optimal_seconds_per_glance_image'], 2)} | "
                     f"{r['seconds_per_glance_image_at_peak']:.2f} |" if sample else "- | - |"))
        rows[-1] += f" {r['wall_seconds']:.0f} |"
    return "\n".join(rows)


def main(argv):
    cache = json.load(open(CACHE)) if os.path.exists(CACHE) else {}
    if "--print" not in argv:
        for run in RUNS:
            if key(run) in cache:
                continue
            cache[key(run)] = plan(*run)
            print(key(run), {k: cache[key(run)].get(k) for k in ("peak_bytes_per_device", "fits",
                                                                 "optimal_seconds_per_step", "error")}, flush=True)
            with open(CACHE, "w") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
    print(table(cache))


if __name__ == "__main__":
    main(sys.argv[1:])
