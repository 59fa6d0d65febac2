"""One prepared GPU check: FLUX.1-dev and Qwen-Image at full size, against diffusers and the FLOP bound.

Random weights at the released sizes (nothing is downloaded), initialised on the device in their dtype by
one compiled init (JAX) or built on the device (torch). One process runs, in order:

1. matmul: the chip's bf16 matrix rate, one large `jnp.dot` (median); every FLOP bound below uses it;
2. flux: the FLUX.1-dev transformer in bf16 at 1024 x 1024 (4096 image + 512 text tokens): one forward and
   the 10-step Glance loop as the project samples (FluxGlancePipeline, official schedule, Slow and Fast
   LoRAs merged), with the platform's attention ("auto": cuDNN flash on a GPU) and with XLA's, each against
   its FLOP bound (XLA's FLOP count at the measured rate);
3. flux_torch: diffusers' FluxTransformer2DModel (torch SDPA), one forward and its FluxPipeline for 10 steps;
4. flux_train: the LoRA train step at the official FLUX preset (glance_jax.train) on a bf16 and an fp8
   base, each with the first remat policy whose compiled peak fits the device (plan.first_fitting_remat):
   median ms and XLA's peak;
5. flux_train_torch: diffusers + peft + torch AdamW (gradient checkpointing), torch's peak allocation;
6. qwen: the Qwen-Image transformer (60 blocks) in bf16, 1024 x 1024, 128 text tokens: one true-CFG step
   (two passes) with each attention, and the 10-step Glance loop with CFG;
7. vae: the FLUX VAE decode at 1024 x 1024 (fp32, as diffusers runs it), Flax against diffusers.

Each measured row is written at once to --out as gpu_check.json and gpu_check.md, so a timeout keeps what
was measured; a failing row records its error and the rest go on; a part that would start after
--budget_s is recorded as skipped. The exit status is 1 when any row has an error. JAX is given
XLA_PYTHON_CLIENT_MEM_FRACTION=0.7 of the GPU (unless set): torch gets the rest. Full size, compiled
programs are cached in .jax_cache/ (git-ignored), so a rerun on a warm machine skips most compiles.

    python benchmarks/gpu_check.py --out gpu_check           # one H200 (see the README, "GPU check")
    python benchmarks/gpu_check.py --tiny --out /tmp/check   # the same code paths with tiny models, CPU
"""

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import sys
import time
import traceback

START = time.perf_counter()  # the time budget counts from here: imports and JAX's start included

# What a GPU machine may lack, checked before anything starts; pure-Python wheels travel with the checkout.
NEEDED = ("jax", "flax", "optax", "orbax", "ml_collections", "torch", "transformers", "peft", "diffusers", "PIL")
MISSING = [name for name in NEEDED if importlib.util.find_spec(name) is None]
if MISSING:
    sys.exit(f"gpu_check.py: error: missing {', '.join(MISSING)}: carry their wheels (README, \"GPU check\")")

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")  # read when JAX starts: the rest is torch's
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), ROOT]  # glance_jax of this checkout, installed or not

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from common import median_seconds  # noqa: E402
from glance_sampling import diffusers_flux_pipeline  # noqa: E402
from torch_peers import flux_inputs  # noqa: E402
from train_step import peft_lora_step  # noqa: E402
from vae import FLUX_VAE  # noqa: E402

from glance_jax import analysis, plan, validation  # noqa: E402
from glance_jax.errors import GlanceError, UsageError  # noqa: E402
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER  # noqa: E402
from glance_jax.qwen_image.adapter import SCHEDULER as QWEN_IMAGE_SCHEDULER  # noqa: E402
from glance_jax.lora import init_lora  # noqa: E402
from glance_jax.models import AutoencoderKL, FluxTransformer2DModel, QwenImageTransformer2DModel  # noqa: E402
from glance_jax.modules import attention  # noqa: E402
from glance_jax.pipelines import (FluxGlancePipeline, QwenImageGlancePipeline, decode_latents, euler_step,  # noqa: E402
                                  transformer_passes)
from glance_jax.quantize import quantize_params  # noqa: E402
from glance_jax.schedules import GlanceSchedule  # noqa: E402
from glance_jax.train import default_config  # noqa: E402
from glance_jax.train_step import make_train_step, optimizer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the check builds: diffusers configs of the three models, the image and text sizes, repeats."""

    flux: dict
    qwen: dict
    vae: dict
    resolution: int
    flux_text: int
    qwen_text: int
    matmul: int
    repeats: int  # forwards, CFG steps, train steps, decodes timed after the first call (compiles)
    loop_repeats: int  # 10-step loops timed after the first call
    budget_s: float  # no row starts later (seconds since the script started)


FULL = Sizes(
    flux=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56)),
    qwen=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    vae=FLUX_VAE, resolution=1024, flux_text=512, qwen_text=128, matmul=16384, repeats=5, loop_repeats=3,
    budget_s=420.0)
TINY = Sizes(
    flux=dict(FULL.flux, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    qwen=dict(FULL.qwen, num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
              axes_dims_rope=(4, 6, 6)),
    vae=dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64),
    resolution=64, flux_text=8, qwen_text=8, matmul=256, repeats=2, loop_repeats=1, budget_s=math.inf)
COLUMNS = (("part", "part"), ("what", "what"), ("ms", "median ms"), ("first_s", "first call s"), ("tflop", "TFLOP"),
           ("bound_ms", "FLOP bound ms"), ("of_bound", "bound / median"), ("peak_gib", "peak GiB"),
           ("note", "note"))


class Results:
    """The check's rows, rewritten to gpu_check.json and gpu_check.md after every row."""

    def __init__(self, out, header, budget_s=math.inf):
        self.out, self.header, self.budget_s, self.rows = out, header, budget_s, []
        os.makedirs(out, exist_ok=True)

    def elapsed(self):
        return time.perf_counter() - START

    def add(self, part, what, **figures):
        row = {"part": part, "what": what, **figures, "at_s": round(self.elapsed(), 1)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def past_budget(self):
        """Why a row is not started when the time budget is spent; None while there is time."""
        if self.elapsed() <= self.budget_s:
            return None
        return f"skipped: {self.elapsed():.0f} s of the {self.budget_s:.0f} s budget spent"

    def attempt(self, part, what, measure):
        """`measure()` -> the row's figures; an exception becomes the row's error and the check goes on.
        Not started past the time budget. True when the row was measured."""
        skipped = self.past_budget()
        try:
            figures = {"error": skipped} if skipped else measure()
        except Exception as e:  # noqa: BLE001 (one failure is one row; the other rows are still measured)
            traceback.print_exc()
            figures = {"error": one_line(e)}
        self.add(part, what, **figures)
        return "error" not in figures

    def document(self):
        """Header, rows so far, and JAX's device memory limit and peak (where the device reports them)."""
        stats = jax.devices()[0].memory_stats() or {}
        memory = {k: stats[k] / 2 ** 30 for k in ("bytes_limit", "peak_bytes_in_use") if k in stats}
        return {**self.header, "elapsed_s": self.elapsed(), "jax_memory_gib": memory, "rows": self.rows}

    def write(self):
        doc = self.document()
        self._replace("gpu_check.json", json.dumps(doc, indent=1) + "\n")
        self._replace("gpu_check.md", markdown(doc))

    def _replace(self, name, text):
        path = os.path.join(self.out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def markdown(doc):
    """The rows as a Markdown table under one line naming the device and versions."""
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"{doc['device']} ({doc['backend']}), jax {doc['jax']}, torch {doc['torch']} on {doc['torch_device']}, "
             f"diffusers {doc['diffusers']}, {doc['sizes']}: {doc['elapsed_s']:.0f} s", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in doc["rows"]:
        note = row.get("note") if "error" not in row else f"error: {row['error']}"
        lines.append("| " + " | ".join(cell(note if key == "note" else row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# ---- helpers shared by the parts ----

def timed(fn, repeats, flops=None, rate=None, **figures):
    """Figures of fn() (which waits for the device): the first call's seconds (compiles included), the median
    ms of `repeats` more, and with XLA's FLOPs the FLOP bound at `rate` (TFLOP/s)."""
    start = time.perf_counter()
    fn()
    figures["first_s"] = time.perf_counter() - start
    figures["ms"] = 1e3 * median_seconds(fn, repeats=repeats, warmup=0)
    if flops is not None:
        figures["tflop"] = flops / 1e12
        if rate:
            figures["bound_ms"] = 1e3 * flops / (rate * 1e12)
            figures["of_bound"] = figures["bound_ms"] / figures["ms"]
    return figures


def random_params(model):
    """Random weights at the model's shapes, made on the device in its parameter dtype, one leaf at a time (no host
    copy; the model's own init would compile its forward too): kernels N(0, 1 / fan_in), norm scales 1, biases 0."""
    key = jax.random.key(0, impl="unsafe_rbg")  # XLA's RngBitGenerator: cheap to compile
    out = {}
    for i, (path, leaf) in enumerate(flatten_dict(jax.eval_shape(model.init_params, jax.random.PRNGKey(0))).items()):
        if path[-1] == "kernel":
            fan_in = leaf.shape[-2] if leaf.ndim in (2, 3) else math.prod(leaf.shape[:-1])  # Dense, stacked, conv
            out[path] = _normal(leaf.shape, leaf.dtype, fan_in)(key, i)
        else:
            out[path] = jnp.full(leaf.shape, 1 if path[-1] == "scale" else 0, leaf.dtype)
    return unflatten_dict(out)


@functools.lru_cache(maxsize=None)
def _normal(shape, dtype, fan_in):
    """One compiled draw per kernel shape: N(0, 1 / fan_in) from a key and the leaf's index."""
    return jax.jit(lambda key, i: jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
                   * jnp.asarray(fan_in ** -0.5, dtype))


def free(*trees):
    """Deletes the device buffers of JAX arrays now (their memory goes back to JAX's pool)."""
    for leaf in jax.tree_util.tree_leaves(trees):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


def attention_impls():
    """The platform's own attention ("auto": cuDNN on a GPU, blocked on a CPU) and XLA's."""
    return tuple(dict.fromkeys((attention.resolve("auto"), "xla")))


def torch_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_module(cls, config, dtype):
    """A diffusers module built on the device directly in `dtype` (no float32 copy anywhere)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(torch_device()):
            return cls(**config).eval()
    finally:
        torch.set_default_dtype(previous)


def torch_timed(fn, repeats, **figures):
    """`timed` for torch work: each run waits for the device."""
    def run():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return timed(run, repeats, **figures)


def flux_case(sizes):
    """FLUX inputs (numpy float32, diffusers' names) and the packed grid side."""
    side = sizes.resolution // 16
    return flux_inputs(sizes.flux, batch=1, grid=(side, side), text_len=sizes.flux_text), side


def flux_model(sizes):
    return FluxTransformer2DModel.from_config(sizes.flux, dtype=jnp.bfloat16)


def bf16_inputs(inputs):
    """Float inputs in bf16 except the position ids (float32, as both implementations compute rotary angles)."""
    return {k: v if v is None or k.endswith("_ids") else v.astype(jnp.bfloat16) for k, v in inputs.items()}


def torch_inputs(inputs):
    """numpy inputs as torch tensors on the device: bf16, position ids float32."""
    as_dtype = lambda k: torch.float32 if k.endswith("_ids") else torch.bfloat16
    return {k: torch.from_numpy(v).to(torch_device(), as_dtype(k)) for k, v in inputs.items() if v is not None}


def preset_loras(params, family):
    """A Slow and a Fast LoRA at the family's official preset (targets, rank, alpha) on `params`."""
    lora = default_config(family).lora
    return [init_lora(jax.random.PRNGKey(k), params, lora.targets, lora.rank, lora.alpha) for k in (1, 2)]


def device_budget(*live):
    """Bytes a new program may take: 95% of JAX's device limit less what arrays other than `live` (the
    program's arguments, which its peak counts) hold. None where the device states no limit (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    args = sum(x.nbytes for x in jax.tree_util.tree_leaves(live) if isinstance(x, jax.Array))
    return 0.95 * stats["bytes_limit"] - (stats["bytes_in_use"] - args)


# ---- the parts ----

def matmul(sizes, results, state):
    n = sizes.matmul
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in (0, 1))
    dot = jax.jit(jnp.dot)
    figures = timed(lambda: dot(a, b).block_until_ready(), 10, flops=2 * n ** 3)
    state["rate"] = 1e3 * figures["tflop"] / figures["ms"]
    results.add("matmul", f"bf16 jnp.dot, {n} x {n} x {n}", **figures,
                note=f"{state['rate']:.1f} TFLOP/s: the rate of every FLOP bound")
    free(a, b)


def flux(sizes, results, state):
    model = flux_model(sizes)
    params = random_params(model)
    inputs, side = flux_case(sizes)
    jax_inputs = jax.device_put(bf16_inputs(inputs))
    state["flux_flops"] = flops = analysis.flops(analysis.for_cost_analysis(model).apply,
                                                 {"params": analysis.abstract(params)}, **jax_inputs)
    schedule = GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=side * side)
    passes = transformer_passes(schedule)
    slow, fast = preset_loras(params, "flux")
    embeds = dict(prompt_embeds=inputs["encoder_hidden_states"], pooled_prompt_embeds=inputs["pooled_projections"])
    rate = state.get("rate")
    for impl in attention_impls():
        m = model.clone(attention_impl=impl)
        forward = jax.jit(m.apply)
        results.attempt("flux", f"Flax forward, {impl} attention", lambda: timed(
            lambda: forward({"params": params}, **jax_inputs).block_until_ready(), sizes.repeats, flops, rate))
        pipe = FluxGlancePipeline(m, params, FLUX_SCHEDULER)
        loop = lambda: pipe(**embeds, height=sizes.resolution, width=sizes.resolution, schedule=schedule,
                            slow_lora=slow, fast_lora=fast).block_until_ready()
        results.attempt("flux", f"Flax 10-step Glance loop, {impl} attention", lambda: timed(
            loop, sizes.loop_repeats, passes * flops, rate, note=f"{passes} passes, LoRAs merged"))
        params = pipe.params  # the pipeline merges in place (donated): its params are the live ones
    state["flux"] = params
    free(slow, fast)


def flux_torch(sizes, results, state):
    model = state["torch_flux"] = torch_module(diffusers.FluxTransformer2DModel, sizes.flux, torch.bfloat16)
    inputs, side = flux_case(sizes)
    t = torch_inputs(inputs)
    flops, rate = state.get("flux_flops"), state.get("rate")

    def forward():
        with torch.no_grad():
            model(**t, return_dict=False)

    results.attempt("flux_torch", "diffusers forward, torch SDPA", lambda: torch_timed(
        forward, sizes.repeats, flops=flops, rate=rate))
    pipe = diffusers_flux_pipeline(model)

    def loop():
        with torch.no_grad():
            pipe(prompt_embeds=t["encoder_hidden_states"], pooled_prompt_embeds=t["pooled_projections"],
                 height=sizes.resolution, width=sizes.resolution, num_inference_steps=10, guidance_scale=3.5,
                 output_type="latent")

    results.attempt("flux_torch", "diffusers FluxPipeline, 10 steps", lambda: torch_timed(
        loop, sizes.loop_repeats, flops=None if flops is None else 10 * flops, rate=rate))


def flux_train_batch(model, config, sizes):
    """The train step's batch, teacher arrays (the data target) and slow-phase mask at the check's sizes."""
    inputs, side = flux_case(sizes)
    encodings = {"prompt_embeds": inputs["encoder_hidden_states"], "pooled_prompt_embeds": inputs["pooled_projections"]}
    cond, _ = model.conditioning(encodings, side, side, config.model.guidance)
    schedule = GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=side * side)
    sigmas = schedule.sigmas()
    teacher = {"sigmas": jnp.asarray(sigmas), "states": jnp.zeros((1, 1, 1, 1))}
    points = jnp.asarray(np.arange(len(sigmas)) < len(schedule.slow), jnp.float32)
    return {"x0": jnp.asarray(inputs["hidden_states"]), "cond": cond}, teacher, points


def jax_train(model, config, params, batch, teacher, points, repeats):
    """Figures of the compiled LoRA train step with the first remat policy whose peak fits the device."""
    adapter = init_lora(jax.random.PRNGKey(0), params, config.lora.targets, config.lora.rank, config.lora.alpha)
    carry = [adapter, optimizer(config.optim).init(adapter)]
    key = jax.random.PRNGKey(1)
    lower = lambda policy: make_train_step(model.clone(remat_policy=policy), config).lower(
        *carry, params, batch, teacher, points, key)
    policy, step, peak = plan.first_fitting_remat(lower, device_budget(carry, params, batch, teacher, points))

    def run():
        carry[0], carry[1], metrics = step(*carry, params, batch, teacher, points, key)
        metrics["loss"].block_until_ready()

    figures = timed(run, repeats, peak_gib=peak / 2 ** 30,
                    note=f"remat {policy} (first that fits), LoRA rank {config.lora.rank}; peak: XLA")
    free(carry)
    return figures


def flux_train(sizes, results, state):
    model = flux_model(sizes)
    params = state.pop("flux", None) or random_params(model)
    config = default_config("flux", "slow")
    batch, teacher, points = flux_train_batch(model, config, sizes)
    results.attempt("flux_train", "Flax LoRA train step, bf16 base", lambda: jax_train(
        model, config, params, batch, teacher, points, sizes.repeats))
    params = quantize_params(params, "fp8")  # frees each bf16 kernel as its fp8 one is made
    results.attempt("flux_train", "Flax LoRA train step, fp8 base", lambda: jax_train(
        model, config, params, batch, teacher, points, sizes.repeats))
    free(params, batch, teacher, points)


def flux_train_torch(sizes, results, state):
    model = state.pop("torch_flux", None) or torch_module(diffusers.FluxTransformer2DModel, sizes.flux,
                                                          torch.bfloat16)
    model.enable_gradient_checkpointing()  # what diffusers' training scripts' --gradient_checkpointing does
    inputs, side = flux_case(sizes)
    t = torch_inputs(inputs)
    config = default_config("flux", "slow")
    sigmas = GlanceSchedule.official(FLUX_SCHEDULER, image_seq_len=side * side).sigmas()
    step = peft_lora_step(model, t["hidden_states"], t["encoder_hidden_states"], t["pooled_projections"], sigmas,
                          side, rank=config.lora.rank, alpha=config.lora.alpha, lr=config.optim.lr)
    cuda = torch.cuda.is_available()

    def measure():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        figures = torch_timed(step, sizes.repeats)
        return dict(figures, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                    note=f"peft LoRA rank {config.lora.rank}, AdamW, gradient checkpointing; peak: torch")

    results.attempt("flux_train_torch", "diffusers + peft + AdamW train step, bf16 base", measure)


def qwen_case(model, sizes):
    """A prompt's and a negative prompt's conditioning, the static inputs and noise, at the check's sizes."""
    side = sizes.resolution // 16
    rng = np.random.default_rng(0)
    encodings = [{"prompt_embeds": rng.standard_normal((1, sizes.qwen_text, model.joint_attention_dim), np.float32),
                  "prompt_embeds_mask": np.ones((1, sizes.qwen_text), np.int32)} for _ in range(2)]
    (cond, static), (neg, _) = (model.conditioning(e, side, side) for e in encodings)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, side * side, model.in_channels), jnp.bfloat16)
    return encodings, cond, neg, static, x


def qwen_step(model, static):
    """One compiled true-CFG Euler step (two passes, Qwen-Image's norm rescale) that waits for its result."""
    step = jax.jit(lambda p, x, c, n: euler_step(model, static, {"params": p}, x, 1.0, -0.1, [c, n], 5.0, True))
    return lambda *args: step(*args).block_until_ready()


def qwen(sizes, results, state):
    model = QwenImageTransformer2DModel.from_config(sizes.qwen, dtype=jnp.bfloat16)
    params = random_params(model)
    encodings, cond, neg, static, x = qwen_case(model, sizes)
    counted = analysis.for_cost_analysis(model)
    flops = analysis.flops(lambda p, x, c: counted.apply({"params": p}, hidden_states=x, timestep=jnp.ones(1),
                                                         **dict(static), **c), analysis.abstract(params), x, cond)
    rate = state.get("rate")
    cfg_step = lambda impl: results.attempt("qwen", f"Flax true-CFG step (2 passes), {impl} attention", lambda: timed(
        functools.partial(qwen_step(model.clone(attention_impl=impl), static), params, x, cond, neg),
        sizes.repeats, 2 * flops, rate))
    first, *others = attention_impls()
    impl = first if cfg_step(first) else "xla"  # the loop with the platform's attention if its step ran
    side = sizes.resolution // 16
    schedule = GlanceSchedule.official(QWEN_IMAGE_SCHEDULER, image_seq_len=side * side)
    passes = transformer_passes(schedule, guided=True)
    slow, fast = preset_loras(params, "qwen-image")
    pipe = QwenImageGlancePipeline(model.clone(attention_impl=impl), params, QWEN_IMAGE_SCHEDULER)
    positive, negative = encodings
    loop = lambda: pipe(prompt_embeds=positive["prompt_embeds"], prompt_embeds_mask=positive["prompt_embeds_mask"],
                        negative_prompt_embeds=negative["prompt_embeds"],
                        negative_prompt_embeds_mask=negative["prompt_embeds_mask"], true_cfg_scale=5.0,
                        height=sizes.resolution, width=sizes.resolution, schedule=schedule, slow_lora=slow,
                        fast_lora=fast).block_until_ready()
    results.attempt("qwen", f"Flax 10-step Glance loop with true CFG, {impl} attention", lambda: timed(
        loop, sizes.loop_repeats, passes * flops, rate, note=f"{passes} passes, LoRAs merged"))
    params = pipe.params  # merged in place (donated): the pipeline's params are the live ones
    for impl in others:
        cfg_step(impl)
    free(params, slow, fast, cond, neg, x)


def vae(sizes, results, state):
    model = AutoencoderKL.from_config(sizes.vae)
    params = random_params(model)
    side = sizes.resolution // 8
    z = np.random.default_rng(0).standard_normal((1, side, side, model.latent_channels)).astype(np.float32)
    z_device = jax.device_put(z)
    decode = jax.jit(lambda p, z: decode_latents(model, p, z))
    flops = analysis.flops(decode, analysis.abstract(params), z)
    results.attempt("vae", "Flax decode, fp32", lambda: timed(
        lambda: decode(params, z_device).block_until_ready(), sizes.repeats, flops, note="no bound: fp32"))
    free(params)
    torch_vae = torch_module(diffusers.AutoencoderKL, sizes.vae, torch.float32)
    config = torch_vae.config
    latents = torch.from_numpy(np.ascontiguousarray(np.moveaxis(z, -1, 1))).to(torch_device())

    def run():
        with torch.no_grad():
            torch_vae.decode(latents / config.scaling_factor + config.shift_factor)

    results.attempt("vae", "diffusers AutoencoderKL.decode, fp32", lambda: torch_timed(run, sizes.repeats))


# ---- the command ----

def header(tiny):
    cuda = torch.cuda.is_available()
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "torch": torch.__version__, "torch_device": torch.cuda.get_device_name() if cuda else "cpu",
            "diffusers": diffusers.__version__, "sizes": "tiny" if tiny else "full size",
            "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}


def run_parts(names, sizes, results):
    """Runs the named parts in order; a part's failure is its row, a part past the time budget is skipped."""
    state = {}
    for name in names:
        if results.past_budget():
            results.add(name, "part", error=results.past_budget())
            continue
        try:
            PARTS[name](sizes, results, state)
        except Exception as e:  # noqa: BLE001 (the rows measured so far stay; the next part still runs)
            traceback.print_exc()
            results.add(name, "part stopped", error=one_line(e))
        gc.collect()  # a part's arrays and modules go before the next one allocates
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


PARTS = {"matmul": matmul, "flux": flux, "flux_torch": flux_torch, "flux_train": flux_train,
         "flux_train_torch": flux_train_torch, "qwen": qwen, "vae": vae}


def parser():
    p = validation.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on any backend (CI runs this on the CPU)")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--budget_s", type=float, default=None,
                   help=f"start no part after this many seconds (default {FULL.budget_s:g}; --tiny: no limit)")
    return p


def main(argv=None):
    try:
        args = parser().parse_args(argv)
        names = args.parts.split(",")
        for name in names:
            if name not in PARTS:
                raise UsageError(f"--parts: unknown part {name!r}: use some of {', '.join(PARTS)}")
        if args.budget_s is not None:
            validation.positive_number("--budget_s", args.budget_s)
    except GlanceError as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    sizes = TINY if args.tiny else FULL
    if not args.tiny:
        jax.config.update("jax_compilation_cache_dir",
                          os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache")))
    if args.budget_s is not None:
        sizes = dataclasses.replace(sizes, budget_s=args.budget_s)
    results = Results(args.out, header(args.tiny), sizes.budget_s)
    run_parts([name for name in PARTS if name in names], sizes, results)
    print(markdown(results.document()))
    return 1 if any("error" in row for row in results.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
