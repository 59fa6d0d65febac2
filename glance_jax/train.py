"""The phase trainer: distils a Slow-LoRA and/or a Fast-LoRA from one image and its caption.

Each phase trains one LoRA on the frozen base with flow-matching steps at
timesteps drawn uniformly from the phase's list:
`x_t = (1 - sigma) x0 + sigma noise`, loss `|v(x_t, t) - target|^2` with
target `noise - x0` (config.target = "data", the paper) or the velocity that
carries x_t to where the frozen base itself lands at the next Glance timestep
(config.target = "teacher"; needs no image, only the caption and noise). For
the teacher target, x_t is the base's own state at the Glance point: the base
integrates `teacher.trajectories` noises on its `teacher.substeps`-step grid
(with `teacher.guidance_scale`, guided), many noises per compiled call, and
the trajectories are cached beside the encoded sample, so both phases and
reruns reuse them. `config.schedule.kind` chooses the Glance points: by step
index (the paper), the base's own K-step schedule ("uniform"), or K points
fitted to those trajectories ("fitted", schedules.GlanceSchedule.fitted).

A run writes into its workdir:
- `slow_lora.safetensors` / `fast_lora.safetensors` (diffusers layout with alpha metadata), written
  once, atomically, from the final state;
- `metrics.jsonl`, one JSON object a step;
- `run.json`: the run's fingerprint (see `glance_jax.runstate`);
- `checkpoints/<phase>/`: orbax checkpoints of the LoRA, the optimizer state, the step and the
  RNG key, the last `checkpoint.keep` kept, with each one's LoRA beside them
  (`checkpoints/<phase>_lora_step<N>.safetensors`). Restarting the same command resumes from the
  last one that restores and ends with the same LoRA, bit for bit on CPU, as an uninterrupted run;
  a restart with another fingerprint is refused.
"""

import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from glance_jax import checkpoints, data, families, lora, runstate, schedules, sharding, validation
from glance_jax.checkpoints import safetensors_io
from glance_jax import safe_io
from glance_jax.errors import GlanceError
from glance_jax.layout import pack_latents
from glance_jax.pipelines import euler_step
from glance_jax.schedules import GlanceSchedule
from glance_jax.train_step import caption_texts, conditioning, learning_rate, make_train_step, optimizer

PHASES = ("slow", "fast")
TEXT_INPUTS = ("encoder_hidden_states", "pooled_projections", "encoder_hidden_states_mask")  # per caption


# ---- the config ----

def default_config(family, phase="both"):
    """The trainer's config with every field, at `family`'s official recipe (glance_jax.families) for `phase`
    ("slow", "fast" or "both"). The files in configs/ start from it and write each recipe value out."""
    recipe = families.get(family).recipe
    rank, lr, caption_dropout = recipe.rank, recipe.lr, recipe.caption_dropout
    c = ml_collections.ConfigDict()
    c.family = family
    c.phase = phase
    c.seed = 0
    c.steps = 60
    c.target = "data"  # "data": the sample's straight-line velocity (the paper); "teacher": the base's trajectory

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # any checkpoint glance-jax loads: diffusers folder, BFL file, converted folder
    c.model.vae_path = ""  # the VAE folder (e.g. FLUX.1-dev/vae): encodes the image; empty: latents precomputed
    c.model.text_encoder_path = ""  # the pipeline folder with text_encoder(s) and tokenizer(s); empty: precomputed
    c.model.dtype = "bf16"  # the frozen base; LoRA and optimizer state are always fp32
    # "fp8" or "int8": 8-bit Dense kernels, one scale per output channel (glance_jax/quantize.py); "none": a base
    # in model.dtype. The official code trains on an optimum-quanto qfloat8 (fp8) transformer, and so do the
    # official configs in configs/ (flux.py, qwen_image.py); "none" here keeps small fp32 runs exact.
    c.model.quantize = "none"
    c.model.remat_policy = "none"  # "none", "full", "dots", "dots_saveable"
    c.model.guidance = 1.0  # FLUX.1-dev's guidance input during training, as the official code passes it

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # images with same-name .txt captions
    c.data.resolution = 1024  # long side in pixels
    c.data.multiple = 32  # crop to a multiple of this many pixels
    c.data.caption_dropout = caption_dropout  # probability of training on the empty prompt " "
    c.data.cache_dir = ""  # encoded latents/embeddings; default ~/.cache/glance_jax

    c.lora = ml_collections.ConfigDict()
    c.lora.targets = family  # a preset (glance_jax.families.lora_preset), or a comma-separated list of module names
    c.lora.rank = rank
    c.lora.alpha = 4.0 * rank

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = lr
    c.optim.warmup_steps = 10  # linear from 0, then constant (diffusers' constant_with_warmup)
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.state_dtype = "fp32"  # Adam's moments; "bf16" halves them (the official Qwen-Image config: 8-bit Adam)

    c.schedule = ml_collections.ConfigDict()
    # "steps": slow_steps / fast_steps, 1-based steps of the base_steps-step schedule at the sample's size (the
    # paper); "uniform": the base's own (num_slow + num_fast)-step schedule, first num_slow steps slow;
    # "fitted": num_slow + num_fast points of the teacher.substeps grid fitted to the teacher's trajectories
    c.schedule.kind = "steps"
    c.schedule.num_slow, c.schedule.num_fast = 5, 5  # for "uniform" and "fitted"
    c.schedule.split = "half"  # "fitted": slow/fast boundary halfway, or an SNR threshold (a number as a string)
    c.schedule.slow_steps = schedules.OFFICIAL_SLOW_STEPS
    c.schedule.fast_steps = schedules.OFFICIAL_FAST_STEPS
    c.schedule.base_steps = 50
    c.schedule.round_bf16 = False  # True: timesteps rounded to bf16, as the official code stores them

    c.teacher = ml_collections.ConfigDict()  # only for target="teacher"
    c.teacher.trajectories = 4  # noise seeds whose teacher trajectories are integrated once, then reused
    c.teacher.substeps = 50  # the base integrates on this fine grid (plus the Glance points)
    c.teacher.batch = 8  # noises integrated per compiled call
    c.teacher.guidance_scale = 1.0  # > 1: guided trajectories (true CFG; FLUX.1-dev: its guidance input)
    c.teacher.negative_prompt = " "  # CFG's negative: the sample's empty-prompt encoding
    # (low, high): trajectory k is guided at scale low + (high - low) k / (trajectories - 1) instead of guidance_scale
    c.teacher.guidance_range = ()
    # more captions (no images) whose trajectories join the caption's: a guided student then learns guidance for
    # more than one prompt; trajectory k is drawn with caption k mod (1 + len(prompts))
    c.teacher.prompts = ()
    c.teacher.minibatch = 1  # (trajectory, point) draws averaged in one step; > 1 for guided trajectories

    c.student = ml_collections.ConfigDict()  # how the trained pair samples
    # > 1: true CFG at this scale, two LoRA'd passes a step (the caption and the negative prompt), as the official
    # Glance-Qwen pipeline samples; the teacher target then matches that combination to the guided teacher's jump.
    # 1: one pass a step (with a guided teacher, the LoRAs must carry the guidance themselves)
    c.student.guidance_scale = 1.0
    c.student.negative_prompt = " "  # the student's CFG negative: the sample's empty-prompt encoding
    # True (a model without a guidance input, target "teacher"): the pair also trains a guidance embedding in the
    # shape of FLUX.1-dev's, on trajectories guided at the scales of teacher.guidance_range, and then samples with
    # one pass a step at a scale of that range (saved in the LoRA files, lora_formats.GUIDANCE_EMBEDDER)
    c.student.guidance_input = False

    c.mesh = ""  # device mesh, e.g. "data=2,fsdp=4" (axes data, fsdp, tensor); empty: one device

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 20
    c.checkpoint.keep = 3
    return c


# ---- the training batch ----

def _pad_text(embeds, mask, length):
    """Text embeddings (T, D) and mask (T,) padded with masked zeros to `length` tokens."""
    pad = length - embeds.shape[0]
    return (np.concatenate([embeds, np.zeros((pad, embeds.shape[1]), embeds.dtype)]),
            np.concatenate([mask, np.zeros(pad, mask.dtype)]))


def training_batch(model, arrays, guidance):
    """(batch, static): the encoded sample as model inputs, and the hashable arguments that shape the program.

    batch["x0"] holds the packed latents, batch["cond"] the model's keyword
    inputs (from the model's `conditioning`), batch["empty_cond"] (if the sample
    has empty-prompt encodings) the inputs used when the caption is dropped,
    batch["teacher_texts"] the text inputs of the caption and of the extra
    captions (`teacher_prompt_embeds`, if any) stacked, (N, 1, ...): trajectory
    k of the teacher is drawn with caption k mod N. Text of any length with a
    mask (Qwen-Image) is padded to a common length; fixed-length text (FLUX)
    must already have one.
    """
    latents = jnp.asarray(arrays["latents"])[None]
    rows, cols = latents.shape[1] // 2, latents.shape[2] // 2
    batch = {"x0": pack_latents(latents)}
    prompts = [p for p in ("", "empty_", "teacher_") if p + "prompt_embeds" in arrays]
    # every group of encodings with a leading axis of captions: one for the caption and the empty prompt
    encodings = {p: {k[len(p):]: np.asarray(v) if p == "teacher_" else np.asarray(v)[None]
                     for k, v in arrays.items() if k.startswith(p + "p")} for p in prompts}
    if families.of(model).masked_text:
        length = max(e["prompt_embeds"].shape[1] for e in encodings.values())
        for e in encodings.values():
            masks = e.get("prompt_embeds_mask", np.ones(e["prompt_embeds"].shape[:2], np.int32)).astype(np.int32)
            padded = [_pad_text(t, m, length) for t, m in zip(e["prompt_embeds"], masks)]
            e["prompt_embeds"], e["prompt_embeds_mask"] = (np.stack(x) for x in zip(*padded))
    elif any(e["prompt_embeds"].shape[1:] != arrays["prompt_embeds"].shape for e in encodings.values()):
        raise GlanceError("empty_prompt_embeds and teacher_prompt_embeds must have the shape of prompt_embeds (FLUX "
                          f"pads to a fixed length): {arrays['prompt_embeds'].shape} for the caption")
    batch["cond"], static = model.conditioning(encodings[""], rows, cols, guidance)
    if "empty_" in encodings:
        empty, _ = model.conditioning(encodings["empty_"], rows, cols, guidance)
        batch["empty_cond"] = {k: v for k, v in empty.items() if v is not None}
    texts = batch["cond"]  # the teacher's captions: the caption, then the extra ones
    if "teacher_" in encodings:
        both = {k: np.concatenate([v, encodings["teacher_"][k]]) for k, v in encodings[""].items()}
        texts, _ = model.conditioning(both, rows, cols, guidance)
    batch["teacher_texts"] = {k: texts[k][:, None] for k in TEXT_INPUTS if texts.get(k) is not None}
    return batch, static


# ---- the teacher target ----

def teacher_grid(schedule, scheduler, substeps, image_seq_len):
    """Sigmas (descending, ending at 0) the base integrates on: its own `substeps`-step schedule (`scheduler`: a
    config dict or a family name) plus the schedule's points (if any), from the first point down."""
    _, grid = schedules.base_schedule(scheduler, substeps, image_seq_len)
    if schedule is None:
        return grid
    points = schedule.sigmas()
    fine = np.unique(np.concatenate([grid, points]))[::-1].astype(np.float32)
    return fine[fine <= points[0]]


def teacher_conditionings(model, batch, config):
    """(cond, negative or None, rescale) with which the frozen base draws its trajectories.

    `teacher.guidance_scale` > 1 guides them: FLUX.1-dev (a guidance embedding) takes the scale as its
    guidance input, one pass a step; other models run true CFG against the negative prompt, two passes a
    step, with the norm rescale for Qwen-Image (as their diffusers pipelines do).
    """
    scale = float(config.teacher.guidance_scale)
    cond = dict(batch["cond"])
    if families.of(model).takes_guidance(model):
        cond["guidance"] = jnp.full((1,), scale if scale > 1 else config.model.guidance, jnp.float32)
        return cond, None, False
    if scale <= 1:
        return cond, None, False
    return cond, negative_conditioning(batch, config.teacher.negative_prompt, "config.teacher.negative_prompt"), \
        families.of(model).cfg_rescale


def negative_conditioning(batch, negative_prompt, field):
    """The model inputs of true CFG's negative prompt: the sample's empty-prompt encoding, the one supported."""
    if negative_prompt.strip():
        raise GlanceError(f"{field} {negative_prompt!r}: only the empty prompt is supported (the sample's "
                          "empty_prompt_embeds)")
    if "empty_cond" not in batch:
        raise GlanceError(f"{field}: true CFG needs empty_prompt_embeds in the encoded sample (the negative prompt)")
    return conditioning(batch, True)


def guidance_regime(config):
    """How the trained pair samples, as its LoRA files record it (lora_formats.GUIDANCE_KEY): the student's true-CFG
    scale and negative prompt, and the transformer passes a step that costs."""
    scale = float(config.student.guidance_scale)
    regime = {"true_cfg_scale": scale, "negative_prompt": config.student.negative_prompt if scale > 1 else None,
              "passes_per_step": 2 if scale > 1 else 1}
    if config.student.guidance_input:  # the scales its guidance embedding was trained for, and the default one
        regime["guidance_input"] = {"range": [float(x) for x in config.teacher.guidance_range],
                                    "default": float(config.teacher.guidance_scale)}
    return regime


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _integrate(model, static, rescale, params, noises, texts, sigmas, cond, neg, scale):
    """The sampler's Euler steps (pipelines.euler_step) of the (guided) base along `sigmas` for a batch of noises
    (M, 1, tokens, C) at once, noise m conditioned on the text inputs `texts[...][m]`, in float32; returns the
    states at every grid point, (M, len(sigmas), tokens, C)."""
    def one(noise, text, scale):
        conds = [{**cond, **text}] + ([] if neg is None else [neg])

        def step(x, sigmas):
            sigma, sigma_next = sigmas
            x = euler_step(model, static, {"params": params}, x, sigma, sigma_next - sigma, conds, scale, rescale)
            return x, x
        _, xs = jax.lax.scan(step, noise, (sigmas[:-1], sigmas[1:]))
        return jnp.concatenate([noise[None], xs])[:, 0]

    return jax.vmap(one)(noises, texts, scale)


def trajectory_scales(config):
    """The guidance scale of each teacher trajectory: teacher.guidance_range spread evenly over them, or
    teacher.guidance_scale for every one."""
    t = config.teacher
    if len(t.guidance_range):
        return np.linspace(*t.guidance_range, int(t.trajectories)).astype(np.float32)
    return np.full(int(t.trajectories), t.guidance_scale, np.float32)


def teacher_trajectories(model, static, params, batch, sigmas, config, key):
    """States (trajectories, len(sigmas), tokens, C) of the frozen base from `teacher.trajectories` noises,
    integrated `teacher.batch` noises per compiled call. The grid is padded with zero-size steps to a multiple
    of 16 points, so that grids of similar length share one compiled program."""
    cond, neg, rescale = teacher_conditionings(model, batch, config)
    noises = jax.random.normal(key, (config.teacher.trajectories, *batch["x0"].shape), jnp.float32)
    chunk = max(1, int(config.teacher.batch))
    n = len(sigmas)
    padded = jnp.asarray(np.pad(np.asarray(sigmas, np.float32), (0, -n % 16), mode="edge"))  # zero-size steps
    scales = jnp.asarray(trajectory_scales(config))
    parts = [_integrate(model, tuple(static), rescale, params, noises[i:i + chunk],
                        caption_texts(batch["teacher_texts"], np.arange(i, min(i + chunk, len(noises)))), padded,
                        cond, neg, scales[i:i + chunk])
             for i in tqdm(range(0, len(noises), chunk), desc="teacher trajectories", unit="batch", leave=False)]
    return jnp.concatenate(parts)[:, :n]


# ---- the run ----

class Run:
    """One training run in `workdir`: loads the base and the sample once, then trains the phases."""

    @runstate.unlock_on_error
    def __init__(self, config, workdir, fresh=False, base=None):
        """`base`: the `(model, params)` that `checkpoints.load_model` gives for this config, already loaded by
        the caller, so that several runs in one process share one copy of the frozen base (single device and
        unquantized only; checked against config.model)."""
        self.config, self.workdir = config, validation.output_folder(workdir)
        validation.train_config(config)  # every value, before anything is loaded
        transformer, vae, text_encoders = families.model_paths(
            config.model.path, config.family, config.model.vae_path, config.model.text_encoder_path,
            what="config.model.path")
        samples = data.find_samples(os.path.expanduser(config.data.dir), config.data.resolution,
                                    config.data.multiple)
        if len(samples) != 1:
            raise GlanceError(f"{config.data.dir}: {len(samples)} image/caption pairs; Glance trains on exactly one")
        self.sample = samples[0]
        if jax.process_index() == 0:
            runstate.lock_workdir(self.workdir)  # one run per workdir: before --fresh clears anything
        if fresh and jax.process_index() == 0:
            runstate.clear_run(self.workdir)
        self.fingerprint = runstate.fingerprint(config, self.sample, transformer, vae, text_encoders)
        runstate.check_fingerprint(self.workdir, self.fingerprint)
        for phase in PHASES if config.phase == "both" else (config.phase,):
            runstate.check_resume_step(runstate.latest_step_on_disk(self.workdir, phase), config.steps,
                                       os.path.join(self.workdir, "checkpoints", phase))
        if jax.process_count() > 1 and not config.mesh:
            raise GlanceError(f"{jax.process_count()} processes: set config.mesh to spread the run over their devices")
        header = checkpoints.open_checkpoint(transformer, families.CLASSES).config  # headers only
        held = checkpoints.model_from_config(header, jnp.float32, families.CLASSES)
        family = families.of(held)
        if family is not families.get(config.family):
            raise GlanceError(f"config.model.path holds a {type(held).__name__}, config.family is {config.family!r}")
        if not family.takes_guidance(held) and config.model.guidance not in (None, 1.0):
            raise GlanceError("config.model.guidance: this model has no guidance embedding")
        if config.student.guidance_input and (family.takes_guidance(held) or not family.guidance_input):
            raise GlanceError("config.student.guidance_input: for a model of a family with a guidance input (FLUX.1) "
                              "that has none; this one has one, or its family has none")
        factor = data.pixels_per_latent(self.sample, vae, family)  # latents are packed 2 x 2 into tokens
        validation.multiple_of("config.data.multiple", config.data.multiple, 2 * factor)
        self.mesh = sharding.make_mesh(config.mesh) if config.mesh else None
        self.writer = jax.process_index() == 0  # only one process writes LoRA files and metrics
        # The sample is encoded (or read from the cache) before the base loads: the VAE and text encoders are
        # released first, and a sample that does not fit the config is refused before the expensive load.
        precomputed = data.PrecomputedEncoder(family.latent_channels(held), family.text_dim(held),
                                              family.pooled_dim(held), factor, with_latents=not vae,
                                              with_text=not text_encoders)
        prompts = tuple(config.teacher.get("prompts", ()))
        encoder = data.SampleEncoder(data.VAEEncoder(vae) if vae else None,
                                     data.FlaxTextEncoder(families.get(config.family), text_encoders,
                                                          config.model.dtype, prompts) if text_encoders else None)
        if not (vae and text_encoders):
            encoder.parts.append(precomputed)
        cache = os.path.expanduser(config.data.cache_dir or os.path.join("~", ".cache", "glance_jax"))
        arrays, self.cache_hit = data.encoded_sample(self.sample, encoder, cache, config.data.resolution)
        arrays = data.with_teacher_prompts(arrays, prompts, self.sample.image_path)
        if config.data.caption_dropout > 0 and "empty_prompt_embeds" not in arrays:
            raise GlanceError("config.data.caption_dropout > 0 needs empty_prompt_embeds in the encoded sample")
        if config.student.guidance_scale > 1 and "empty_prompt_embeds" not in arrays:
            raise GlanceError("config.student.guidance_scale > 1 needs empty_prompt_embeds in the encoded sample "
                              "(the negative prompt)")
        if base is None:
            self.model, self.params = families.load_model(transformer, config.model.dtype,
                                                             mesh=self.mesh, remat_policy=config.model.remat_policy,
                                                             quantize=config.model.get("quantize"))
        else:
            self.model, self.params = _checked_base(base, header, config, self.mesh)
        self.batch, self.static = training_batch(self.model, arrays, config.model.guidance)
        if self.mesh is not None:
            self.batch = sharding.place(self.batch, self.batch_shardings())
        self.cache = cache
        self.schedule = self.choose_schedule()
        os.makedirs(self.workdir, exist_ok=True)
        if self.writer:
            runstate.write_fingerprint(self.workdir, self.fingerprint)

    def choose_schedule(self):
        """The Glance schedule by `config.schedule.kind`: "steps" (indices of the base_steps grid, the paper),
        "uniform" (the base's own K-step schedule split in two) or "fitted" (K points of the teacher.substeps
        grid fitted to the teacher's trajectories; integrates them first, or reads them from the cache)."""
        c, image_seq_len = self.config.schedule, self.batch["x0"].shape[1]
        scheduler = families.get(self.config.family).scheduler
        kind = c.get("kind", "steps")
        if kind == "steps":
            return GlanceSchedule.from_steps(scheduler, c.slow_steps, c.fast_steps, image_seq_len,
                                             c.base_steps, c.round_bf16)
        if kind == "uniform":
            return GlanceSchedule.uniform(scheduler, c.num_slow, c.num_fast, image_seq_len)
        if kind == "fitted":
            substeps = self.config.teacher.substeps
            states = self.trajectories(teacher_grid(None, scheduler, substeps, image_seq_len))
            return GlanceSchedule.fitted(scheduler, np.asarray(states), c.num_slow, c.num_fast,
                                         image_seq_len, substeps, c.split)
        raise GlanceError(f"config.schedule.kind {kind!r}: use 'steps', 'uniform' or 'fitted'")

    def trajectories(self, sigmas):
        """The base's trajectories on the grid `sigmas`, from the cache when an identical set was integrated
        before (the key covers the base's identity as the run's fingerprint has it, its dtype and quantization,
        the encoded sample, the grid, guidance, count and seed)."""
        t = self.config.teacher
        key = [self.fingerprint["base"], self.config.model.dtype, self.config.model.get("quantize"),
               int(t.trajectories), float(t.guidance_scale), t.negative_prompt, self.config.model.guidance,
               int(self.config.seed)]
        if len(t.guidance_range):
            key.append([float(x) for x in t.guidance_range])
        digest = hashlib.sha256(json.dumps(key).encode())
        for leaf in [np.asarray(sigmas, np.float32)] + jax.tree_util.tree_leaves(self.batch):
            digest.update(np.asarray(leaf).tobytes())
        path = os.path.join(self.cache, "teacher-" + digest.hexdigest()[:32] + ".safetensors")
        if os.path.isfile(path):
            return jnp.asarray(safetensors_io.SafetensorsFile(path).read("states"))
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 10 ** 6)
        states = teacher_trajectories(self.model, self.static, self.params, self.batch, sigmas, self.config, key)
        if self.writer:
            os.makedirs(self.cache, exist_ok=True)
            safetensors_io.save_file({"states": np.asarray(states), "sigmas": np.asarray(sigmas, np.float32)}, path)
        return states

    def batch_shardings(self):
        return jax.tree_util.tree_map(lambda x: sharding.batch_sharding(self.mesh, x.shape), self.batch)

    def step_shardings(self, adapter, opt_state, teacher):
        """(in, out) shardings of the train step: the base, LoRA and Adam state by rule, the batch over data."""
        mesh, rep = self.mesh, sharding.replicated(self.mesh)
        lora_sh, opt_sh = sharding.tree_shardings(adapter, mesh), sharding.tree_shardings(opt_state, mesh)
        teacher_sh = jax.tree_util.tree_map(lambda _: rep, teacher)
        param_sh = jax.tree_util.tree_map(lambda x: x.sharding, self.params)
        return ((lora_sh, opt_sh, param_sh, self.batch_shardings(), teacher_sh, rep, rep),
                (lora_sh, opt_sh, {"loss": rep, "timestep": rep, "grad_norm": rep}))

    def teacher_inputs(self):
        """"sigmas": the Glance points (then 0) and, for the teacher target, "states": the base's states there
        (trajectories, points, tokens, C), both padded to a multiple of 16 points, so that schedules of up to
        15 steps share one compiled train step, and "texts": the captions they were drawn with (N, 1, ...)."""
        sigmas = self.schedule.sigmas()
        if self.config.target != "teacher":
            return {"sigmas": jnp.asarray(_pad_points(sigmas)), "states": jnp.zeros((1, 1, 1, 1))}
        scheduler = families.get(self.config.family).scheduler
        grid = teacher_grid(self.schedule, scheduler, self.config.teacher.substeps, self.batch["x0"].shape[1])
        at = jnp.asarray([int(np.argmin(np.abs(grid - s))) for s in sigmas])
        states = self.trajectories(grid)[:, at]
        return {"sigmas": jnp.asarray(_pad_points(sigmas)), "states": _pad_points(states, axis=1),
                "texts": self.batch["teacher_texts"], "scales": jnp.asarray(trajectory_scales(self.config))}

    def train(self):
        """Trains the configured phase(s); returns {phase: path of its LoRA file}."""
        phases = PHASES if self.config.phase == "both" else (self.config.phase,)
        teacher = self.teacher_inputs()
        # (the schedule is also in the LoRA files' metadata)
        safe_io.write_json(os.path.join(self.workdir, "schedule.json"), self.schedule.to_dict(), indent=1)
        written = {phase: self.train_phase(phase, teacher) for phase in phases}
        runstate.release_workdir(self.workdir)
        return written

    def initial_state(self, phase, teacher):
        """(LoRA, optimizer state, points, key) with which `phase` starts: `points` masks the phase's timesteps
        among `teacher["sigmas"]` (a fixed shape), the key is the phase's."""
        config = self.config
        n_slow = len(self.schedule.slow)
        chosen = range(n_slow) if phase == "slow" else range(n_slow, self.schedule.num_steps)
        points = jnp.asarray(np.isin(np.arange(teacher["sigmas"].shape[0]), list(chosen)), jnp.float32)
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PHASES.index(phase))
        targets = config.lora.targets
        targets = targets if families.is_preset(targets) else [t.strip() for t in targets.split(",")]
        adapter = lora.init_lora(jax.random.fold_in(key, 1), self.params, targets, config.lora.rank,
                                 float(config.lora.alpha))
        if config.student.guidance_input:
            adapter = families.get(config.family).add_guidance_embedder(jax.random.fold_in(key, 2), adapter,
                                                                      self.params)
        return adapter, optimizer(config.optim).init(adapter), points, key

    def compile_step(self):
        """Compiles the train step of this run (one program for both phases) without taking a step, so that a
        caller can compile it on another thread while other work runs; `train` then finds it compiled.
        Single-device runs only (a mesh run compiles on its first step)."""
        if self.mesh is not None:
            return
        teacher = self.teacher_inputs()
        adapter, opt_state, points, key = self.initial_state(PHASES[0], teacher)
        make_train_step(self.model, self.config, self.static).lower(
            adapter, opt_state, self.params, self.batch, teacher, points, jax.random.fold_in(key, 0)).compile()

    def train_phase(self, phase, teacher):
        import orbax.checkpoint as ocp

        config = self.config
        adapter, opt_state, points, key = self.initial_state(phase, teacher)
        step_shardings = None
        if self.mesh is not None:
            step_shardings = self.step_shardings(adapter, opt_state, teacher)
            adapter, opt_state = sharding.place((adapter, opt_state), step_shardings[0][:2])
        open_manager = lambda: ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints", phase),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True))
        template = {"lora": adapter, "opt_state": opt_state, "step": 0, "key": np.asarray(key)}
        manager, start, state = runstate.restore_latest(
            open_manager, lambda m, step: m.restore(step, args=ocp.args.StandardRestore(template)), self.writer)
        if state is not None:
            adapter, opt_state = state["lora"], state["opt_state"]
            if not np.array_equal(np.asarray(state["key"]), np.asarray(key)):
                raise GlanceError(f"{manager.directory}: checkpoints come from a run with another seed")
        runstate.check_resume_step(start, config.steps, manager.directory)
        metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        if self.writer:
            _truncate_metrics(metrics_path, phase, start)
        step_fn = make_train_step(self.model, config, self.static, step_shardings)
        lr = learning_rate(config.optim)
        lora_path = runstate.final_lora_path(self.workdir, phase)
        if start < config.steps and self.writer and os.path.exists(lora_path):
            os.remove(lora_path)  # a shorter run's LoRA: while this one goes on, the final path holds none

        def save(step):
            manager.save(step, args=ocp.args.StandardSave(
                {"lora": adapter, "opt_state": opt_state, "step": step, "key": np.asarray(key)}))
            manager.wait_until_finished()
            if step == config.steps:
                return  # the final LoRA is written below, from the final state
            host_lora = multihost_utils.process_allgather(adapter, tiled=True)  # every process joins; one writes
            if self.writer:  # a checkpoint's LoRA carries its step; the final path only ever holds a finished one
                lora.save_lora(host_lora, runstate.intermediate_lora_path(self.workdir, phase, step),
                               family=families.get(config.family), schedule=self.schedule,
                               guidance=guidance_regime(config))
                runstate.prune_intermediate(self.workdir, phase, config.checkpoint.keep)

        bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"{phase}-LoRA",
                   unit="step", dynamic_ncols=True, disable=not self.writer)
        with safe_io.append_file(metrics_path) if self.writer else open(os.devnull, "a") as metrics:
            for step in bar:
                began = time.perf_counter()
                adapter, opt_state, out = step_fn(adapter, opt_state, self.params, self.batch, teacher, points,
                                                  jax.random.fold_in(key, step))
                loss = float(out["loss"])
                if not np.isfinite(loss):
                    last = manager.latest_step()
                    raise GlanceError(f"the {phase} loss became {loss} at step {step + 1}; stopped. The last good "
                                      f"checkpoint is {'step ' + str(last) if last else 'none'} in {manager.directory}")
                seconds = time.perf_counter() - began
                record = {"phase": phase, "step": step + 1, "loss": loss, "lr": float(lr(step)),
                          "timestep": float(out["timestep"]), "grad_norm": float(out["grad_norm"]),
                          "steps_per_sec": 1.0 / seconds}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss:.4f}", t=f"{record['timestep']:.0f}")
                if (step + 1) % config.checkpoint.every == 0 or step + 1 == config.steps:
                    save(step + 1)
        # Always from the final state (also when a restart finds the last checkpoint already written):
        # save_lora writes a temporary file and renames it, so the path holds a whole, finished LoRA or none.
        host_lora = multihost_utils.process_allgather(adapter, tiled=True)
        if self.writer:
            lora.save_lora(host_lora, lora_path, family=families.get(config.family), schedule=self.schedule,
                           guidance=guidance_regime(config))
        manager.close()
        return lora_path


def _checked_base(base, header, config, mesh):
    """`base` if it is what `checkpoints.load_model` would give this config (`header`: the checkpoint's model
    config): the same model (class, sizes, dtype, remat policy) and parameters of its shapes and dtypes; a
    GlanceError otherwise."""
    if mesh is not None or config.model.get("quantize") not in (None, "none"):
        raise GlanceError("Run(base=...): a shared base is for single-device, unquantized runs; leave it out")
    model, params = base
    expected = checkpoints.model_from_config(header, checkpoints.parse_dtype(config.model.dtype), families.CLASSES,
                                             remat_policy=config.model.remat_policy)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
    if model != expected or shapes(params) != shapes(checkpoints.abstract_params(expected)):
        raise GlanceError(f"Run(base=...): not the base config.model describes ({config.model.path}, "
                          f"{config.model.dtype}, remat {config.model.remat_policy}); leave base out to load it")
    return model, params


def _pad_points(x, axis=0, multiple=16):
    """`x` with zeros appended along `axis` up to a multiple of 16 points (never indexed: padding only)."""
    pad = -x.shape[axis] % multiple
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return (jnp.pad if isinstance(x, jax.Array) else np.pad)(x, widths)


def _truncate_metrics(path, phase, step):
    """Drops this phase's metric lines after `step`, so that a resumed run does not log a step twice."""
    if not os.path.exists(safe_io.own_file(path)):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line)["phase"] != phase or json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        with safe_io.atomic_file(path, "w") as f:
            f.writelines(keep)


def train(config, workdir, fresh=False):
    """Runs the trainer; returns {phase: LoRA file}. `fresh`: clear a previous run's files in `workdir` first."""
    try:
        return Run(config, workdir, fresh).train()
    finally:
        runstate.release_workdir(workdir)

