"""Peak host memory of `glance-jax convert` on a full-width FLUX.1-dev with 1 double + 2 single blocks.

A random diffusers checkpoint (fp32, 2.6 GB) is written to a temporary
folder, then converted in a fresh process to fp32, to bf16 and to an fp8
base (`--quantize fp8`: 8-bit kernels, float32 scales, bf16 otherwise).
The baseline is taken after imports and after the JAX CPU runtime has started
(about 0.25 GiB that any JAX process holds, independent of the model). The child
reports its resident memory after imports and its peak (VmHWM) after the
conversion; the figure of merit is the growth over the output's size
(the goal is at most about 1.3x).

    python benchmarks/convert_memory.py   # about 2 minutes, 8 GB of free disk
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
from diffusers import FluxTransformer2DModel as TorchFlux

from glance_jax import checkpoints, quantize
from glance_jax.models import FluxTransformer2DModel

CHILD = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from glance_jax import checkpoints, families
import orbax.checkpoint, tqdm  # everything the command imports
import jax, jax.numpy as jnp
jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()  # the JAX CPU runtime: ~0.25 GiB, whatever the model
base = status("VmRSS")
checkpoints.convert_checkpoint(sys.argv[1], sys.argv[2], families.CLASSES, dtype=sys.argv[3], quantize=sys.argv[4])
print(json.dumps({"baseline": base, "peak": status("VmHWM")}))
"""


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def output_bytes(dtype, kind):
    """Bytes of the converted parameters, from abstract shapes: what the converter must hold at least."""
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True,
                                   param_dtype=checkpoints.parse_dtype(dtype))
    params = checkpoints.abstract_params(model)
    params = quantize.abstract(params, kind) if kind != "none" else params
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        model = TorchFlux(num_layers=1, num_single_layers=2, guidance_embeds=True)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(src)
        del model
        print(f"source: {n_params / 1e6:.0f} M parameters, {folder_bytes(src) / 2**30:.2f} GiB of fp32 safetensors")
        for dtype, kind in (("fp32", "none"), ("bf16", "none"), ("bf16", "fp8")):
            dst = os.path.join(tmp, f"out-{dtype}-{kind}")
            out = subprocess.run([sys.executable, "-c", CHILD, src, dst, dtype, kind], capture_output=True,
                                 text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            output = output_bytes(dtype, kind)
            growth = figures["peak"] - figures["baseline"]
            name = dtype if kind == "none" else f"{kind} (quantized; {dtype} otherwise)"
            print(f"to {name}: output {output / 2**30:.2f} GiB (on disk {folder_bytes(dst) / 2**30:.2f} GiB), "
                  f"process after imports {figures['baseline'] / 2**30:.2f} GiB, "
                  f"peak {figures['peak'] / 2**30:.2f} GiB: growth {growth / output:.2f}x the output")
            print(json.dumps({"benchmark": "convert_memory", "dtype": dtype, "quantize": kind, "output_bytes": output,
                              "disk_bytes": folder_bytes(dst),
                              "baseline_rss": figures["baseline"], "peak_rss": figures["peak"],
                              "growth_over_output": growth / output}))


if __name__ == "__main__":
    main()
