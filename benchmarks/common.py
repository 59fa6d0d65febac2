"""Timing helpers shared by the benchmark scripts: medians of repeated runs, one JSON line of results."""

import json
import statistics
import time


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
