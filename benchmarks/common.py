"""Timing helpers shared by the benchmark scripts: medians of repeated runs, one JSON line of results."""

import json
import statistics
import time

# The small FLUX.1-dev-shaped model of the sampling and training benchmarks: hidden 384 (6 heads x 64),
# 2 double + 4 single blocks, a 256 x 256 image (256 packed tokens) and 64 text tokens.
SMALL_FLUX = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
                  joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True, axes_dims_rope=[8, 28, 28])
SMALL_SIZE, SMALL_TEXT = 256, 64


def median_seconds(fn, repeats=7, warmup=1):
    """Median wall time of fn() over `repeats` runs after `warmup` runs (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name, **figures):
    """Prints the figures as a table and as one JSON line (for notes and CI logs)."""
    print(f"== {name}")
    for k, v in figures.items():
        print(f"  {k:<34} {v:.4g}" if isinstance(v, float) else f"  {k:<34} {v}")
    print(json.dumps({"benchmark": name, **figures}))


def interleaved_medians(fns, repeats=5, warmup=1):
    """Median wall time of each fn in {name: fn}, run in turn so that a slow spell of the machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
