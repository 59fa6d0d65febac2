"""The phase trainer: distils a Slow-LoRA and/or a Fast-LoRA from one image and its caption.

Each phase trains one LoRA on the frozen base with flow-matching steps at
timesteps drawn uniformly from the phase's list:
`x_t = (1 - sigma) x0 + sigma noise`, loss `|v(x_t, t) - target|^2` with
target `noise - x0` (config.target = "data", the paper) or the velocity that
carries x_t to where the frozen base itself lands at the next Glance timestep
(config.target = "teacher"; needs no image, only the caption and noise; the
base's trajectories and their cache: glance_jax.trajectories). The loss and
the step: glance_jax.train_step; the config's fields: glance_jax.train_config.
`config.schedule.kind` chooses the Glance points: by step index (the paper),
the base's own K-step schedule ("uniform"), or K points fitted to the
teacher's trajectories ("fitted", schedules.GlanceSchedule.fitted).

`train(config, workdir)` reads top to bottom: `prepare` resolves the run
(every header read once), encodes the sample, loads the base and chooses the
schedule; `train_phases` then restores, loops and saves each phase. Several
runs can share one loaded base: `load_base(config)` once, then
`prepare(config, workdir, base=base)` for each run, `compile_step(run)`
(optional, on any thread) and `train_phases(run)`.

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

import dataclasses
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from glance_jax import checkpoints, data, families, lora, runstate, safe_io, sharding, train_config, trajectories
from glance_jax import validation
from glance_jax.errors import GlanceError
from glance_jax.schedules import GlanceSchedule
from glance_jax.train_config import PHASES, default_config  # noqa: F401 (default_config: the public name)
from glance_jax.train_step import learning_rate, make_train_step, optimizer



@dataclasses.dataclass(frozen=True)
class Run:
    """One prepared training run (`prepare`): what its phases read, resolved, encoded and loaded once."""

    config: ml_collections.ConfigDict
    workdir: str
    fingerprint: dict  # runstate.fingerprint: what shapes the result
    mesh: Any  # the device mesh, or None for one device
    writer: bool  # this process writes the LoRA files, metrics and caches (process 0)
    cache: str  # the folder of encoded samples and teacher trajectories
    cache_hit: bool  # the encoded sample came from the cache: no encoder ran
    model: Any  # the frozen base
    params: Any
    batch: dict  # the encoded sample as model inputs (training_batch)
    static: tuple  # the hashable arguments that shape the model's program
    schedule: GlanceSchedule = None


# ---- the trainer ----

def train(config, workdir, fresh=False, base=None):
    """Runs the trainer; returns {phase: LoRA file}. `fresh`: clear a previous run's files in `workdir` first;
    `base`: a loaded base to share (`load_base`)."""
    try:
        return train_phases(prepare(config, workdir, fresh, base))
    finally:
        runstate.release_workdir(workdir)


@runstate.unlock_on_error
def prepare(config, workdir, fresh=False, base=None):
    """A run ready to train in `workdir`, its workdir locked: config and files checked, the sample encoded (or
    read from the cache), the base loaded and the schedule chosen (fitted: on the teacher's trajectories).

    `base`: the `(model, params)` that `load_base(config)` gives, loaded once by the caller, so that several
    runs in one process share one copy of the frozen base (single device and unquantized; checked against
    config.model).
    """
    workdir = validation.output_folder(workdir)
    # ---- resolve: every check and header, before anything loads ----
    sources = resolve(config, workdir, fresh)
    # ---- encode: before the base loads, so the encoders are released first ----
    arrays, cache_hit, cache = encode(config, sources)
    # ---- load ----
    if base is None:
        model, params = _load(config, sources.transformer, sources.mesh)
    else:
        model, params = check_base(base, sources.header, config)
    batch, static = training_batch(sources.family, model, arrays, config.model.guidance)
    if sources.mesh is not None:
        batch = sharding.place(batch, batch_shardings(sources.mesh, batch))
    run = Run(config, workdir, sources.fingerprint, sources.mesh, jax.process_index() == 0, cache, cache_hit,
              model, params, batch, static)
    # ---- schedule ----
    run = dataclasses.replace(run, schedule=choose_schedule(run))
    os.makedirs(workdir, exist_ok=True)
    if run.writer:
        runstate.write_fingerprint(workdir, run.fingerprint)
    return run


def train_phases(run):
    """Trains the prepared run's phase(s), each from its newest checkpoint; returns {phase: its LoRA file} and
    gives the workdir's lock back."""
    teacher = teacher_inputs(run)
    # (the schedule is also in the LoRA files' metadata)
    safe_io.write_json(os.path.join(run.workdir, "schedule.json"), run.schedule.to_dict(), indent=1)
    written = {phase: train_phase(run, phase, teacher) for phase in _phases(run.config)}
    runstate.release_workdir(run.workdir)
    return written


def compile_step(run):
    """Compiles the prepared run's train step (one program for both phases) without taking a step, so that a
    caller can compile it on another thread while other runs train; `train_phases` then finds it compiled.
    Single-device runs only (a mesh run compiles on its first step)."""
    if run.mesh is not None:
        return
    teacher = teacher_inputs(run)
    adapter, opt_state, points, key = initial_state(run, PHASES[0], teacher)
    make_train_step(run.model, run.config, run.static).lower(
        adapter, opt_state, run.params, run.batch, teacher, points, jax.random.fold_in(key, 0)).compile()


def _phases(config):
    return PHASES if config.phase == "both" else (config.phase,)


# ---- resolve ----

class Sources(NamedTuple):
    """What a run reads, found and checked before anything loads."""

    transformer: str  # the base's checkpoint
    vae: Any  # the VAE's folder, or None: the latents are precomputed
    text_encoders: Any  # the text encoders' folder, or None: the text encodings are precomputed
    sample: data.Sample
    fingerprint: dict
    header: dict  # the base's model config (its config.json)
    held: Any  # the model that header describes, without parameters: its sizes
    family: Any  # its glance_jax.families record, which answers everything that differs between families
    pixels_per_latent: int
    mesh: Any


def resolve(config, workdir, fresh):
    """The run's `Sources`: the config checked, the model paths and the sample found, the workdir locked (and
    cleared if `fresh`) and checked against the run's fingerprint, the base's header read and checked."""
    train_config.check(config)  # every value, before anything is loaded
    transformer, vae, text_encoders = _model_paths(config)
    samples = data.find_samples(os.path.expanduser(config.data.dir), config.data.resolution, config.data.multiple,
                                [os.path.expanduser(d) for d in config.data.sources])
    if len(samples) != 1:
        raise GlanceError(f"{config.data.dir}: {len(samples)} image/caption pairs; Glance trains on exactly one")
    if jax.process_index() == 0:
        runstate.lock_workdir(workdir)  # one run per workdir: before --fresh clears anything
    if fresh and jax.process_index() == 0:
        runstate.clear_run(workdir)
    fingerprint = runstate.fingerprint(train_config.fingerprinted(config), samples[0], transformer, vae,
                                       text_encoders)
    runstate.check_fingerprint(workdir, fingerprint)
    for phase in _phases(config):
        runstate.check_resume_step(runstate.latest_step_on_disk(workdir, phase), config.steps,
                                   os.path.join(workdir, "checkpoints", phase))
    if jax.process_count() > 1 and not config.mesh:
        raise GlanceError(f"{jax.process_count()} processes: set config.mesh to spread the run over their devices")
    header = checkpoints.open_checkpoint(transformer, families.CLASSES).config  # headers only
    held = checkpoints.model_from_config(header, jnp.float32, families.CLASSES)
    family = _check_model(config, held)
    factor = data.pixels_per_latent(samples[0], vae, family)  # latents are packed 2 x 2 into tokens
    validation.multiple_of("config.data.multiple", config.data.multiple, 2 * factor)
    mesh = sharding.make_mesh(config.mesh) if config.mesh else None
    return Sources(transformer, vae, text_encoders, samples[0], fingerprint, header, held, family, factor, mesh)


def _model_paths(config):
    """(transformer, VAE or None, text encoders or None) of config.model."""
    return families.model_paths(config.model.path, config.family, config.model.vae_path,
                                config.model.text_encoder_path, what="config.model.path")


def _check_model(config, held):
    """Checks the config against the base's header (`held`); returns its family."""
    family = families.get(config.family)
    if not isinstance(held, family.transformer):
        raise GlanceError(f"config.model.path holds a {type(held).__name__}, config.family is {config.family!r}")
    if not family.takes_guidance(held) and config.model.guidance not in (None, 1.0):
        raise GlanceError("config.model.guidance: this model has no guidance embedding")
    if config.student.guidance_input and (family.takes_guidance(held) or not family.guidance_input):
        raise GlanceError("config.student.guidance_input: for a model of a family with a guidance input (FLUX.1) "
                          "that has none; this one has one, or its family has none")
    return family


# ---- encode ----

def encode(config, sources):
    """(arrays, cache hit, cache folder): the sample encoded by the VAE and text encoders, or read from the
    cache or from the precomputed encodings beside the image; refused if it lacks what the config needs."""
    held, family = sources.held, sources.family
    precomputed = data.PrecomputedEncoder(family.latent_channels(held), family.text_dim(held), family.pooled_dim(held),
                                          sources.pixels_per_latent, with_latents=not sources.vae,
                                          with_text=not sources.text_encoders, sources=len(sources.sample.sources))
    prompts = tuple(config.teacher.prompts)
    encoder = data.SampleEncoder(data.VAEEncoder(sources.vae) if sources.vae else None,
                                 data.FlaxTextEncoder(family, sources.text_encoders,
                                                      config.model.dtype, prompts) if sources.text_encoders else None)
    if not (sources.vae and sources.text_encoders):
        encoder.parts.append(precomputed)
    cache = os.path.expanduser(config.data.cache_dir or os.path.join("~", ".cache", "glance_jax"))
    arrays, cache_hit = data.encoded_sample(sources.sample, encoder, cache, config.data.resolution)
    arrays = data.with_teacher_prompts(arrays, prompts, sources.sample.image_path)
    if config.data.caption_dropout > 0 and "empty_prompt_embeds" not in arrays:
        raise GlanceError("config.data.caption_dropout > 0 needs empty_prompt_embeds in the encoded sample")
    if config.student.guidance_scale > 1 and "empty_prompt_embeds" not in arrays:
        raise GlanceError("config.student.guidance_scale > 1 needs empty_prompt_embeds in the encoded sample "
                          "(the negative prompt)")
    return arrays, cache_hit, cache


def _pad_text(embeds, mask, length):
    """Text embeddings (T, D) and mask (T,) padded with masked zeros to `length` tokens."""
    pad = length - embeds.shape[0]
    return (np.concatenate([embeds, np.zeros((pad, embeds.shape[1]), embeds.dtype)]),
            np.concatenate([mask, np.zeros(pad, mask.dtype)]))


def training_batch(family, model, arrays, guidance):
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
    rows, cols = family.token_grid(latents)
    batch = {"x0": family.pack_latents(latents)}
    prompts = [p for p in ("", "empty_", "teacher_") if p + "prompt_embeds" in arrays]
    # every group of encodings with a leading axis of captions: one for the caption and the empty prompt
    encodings = {p: {k[len(p):]: np.asarray(v) if p == "teacher_" else np.asarray(v)[None]
                     for k, v in arrays.items() if k.startswith(p + "p")} for p in prompts}
    sources = tuple(np.asarray(arrays[data.source_key(i)])[None] for i in range(family.reference_images)
                    if data.source_key(i) in arrays)  # an edit: the source images' latents, beside every caption's
    if family.masked_text:
        length = max(e["prompt_embeds"].shape[1] for e in encodings.values())
        for e in encodings.values():
            masks = e.get("prompt_embeds_mask", np.ones(e["prompt_embeds"].shape[:2], np.int32)).astype(np.int32)
            padded = [_pad_text(t, m, length) for t, m in zip(e["prompt_embeds"], masks)]
            e["prompt_embeds"], e["prompt_embeds_mask"] = (np.stack(x) for x in zip(*padded))
    elif any(e["prompt_embeds"].shape[1:] != arrays["prompt_embeds"].shape for e in encodings.values()):
        raise GlanceError("empty_prompt_embeds and teacher_prompt_embeds must have the shape of prompt_embeds (FLUX "
                          f"pads to a fixed length): {arrays['prompt_embeds'].shape} for the caption")
    for p in ("", "empty_"):  # the teacher's extra captions give text inputs only
        if sources and p in encodings:
            encodings[p]["image_latents"] = sources
    batch["cond"], static = family.conditioning(model, encodings[""], rows, cols, guidance)
    if "empty_" in encodings:
        empty, _ = family.conditioning(model, encodings["empty_"], rows, cols, guidance)
        batch["empty_cond"] = {k: v for k, v in empty.items() if v is not None}
    texts = batch["cond"]  # the teacher's captions: the caption, then the extra ones
    if "teacher_" in encodings:
        both = {k: np.concatenate([v, encodings["teacher_"][k]]) for k, v in encodings[""].items()
                if k != "image_latents"}
        texts, _ = family.conditioning(model, both, rows, cols, guidance)
    batch["teacher_texts"] = {k: texts[k][:, None] for k in family.text_inputs if texts.get(k) is not None}
    return batch, static


# ---- load ----

def load_base(config):
    """The frozen base config.model describes, `(model, params)`, loaded once for several runs to share (pass it
    to `prepare` or `train` as `base`). Single device and unquantized only."""
    train_config.check(config)
    _shareable(config)
    return _load(config, _model_paths(config)[0], None)


def _load(config, transformer, mesh):
    return families.load_model(transformer, config.model.dtype, mesh=mesh, remat_policy=config.model.remat_policy,
                               quantize=config.model.quantize)


def _shareable(config):
    if config.mesh or config.model.quantize != "none":
        raise GlanceError("prepare(base=...): a shared base is for single-device, unquantized runs; leave it out")


def check_base(base, header, config):
    """`base` if it is what `load_base(config)` gives (`header`: the checkpoint's model config): the same model
    (class, sizes, dtype, remat policy) and parameters of its shapes and dtypes; a GlanceError otherwise."""
    _shareable(config)
    model, params = base
    expected = checkpoints.model_from_config(header, checkpoints.parse_dtype(config.model.dtype), families.CLASSES,
                                             remat_policy=config.model.remat_policy)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
    if model != expected or shapes(params) != shapes(checkpoints.abstract_params(expected)):
        raise GlanceError(f"prepare(base=...): not the base config.model describes ({config.model.path}, "
                          f"{config.model.dtype}, remat {config.model.remat_policy}); leave base out to load it")
    return model, params


def batch_shardings(mesh, batch):
    return jax.tree_util.tree_map(lambda x: sharding.batch_sharding(mesh, x.shape), batch)


# ---- schedule ----

def choose_schedule(run):
    """The Glance schedule by `config.schedule.kind`: "steps" (indices of the base_steps grid, the paper),
    "uniform" (the base's own K-step schedule split in two) or "fitted" (K points of the teacher.substeps
    grid fitted to the teacher's trajectories; integrates them first, or reads them from the cache)."""
    config, image_seq_len = run.config, run.batch["x0"].shape[1]
    c, scheduler = config.schedule, families.get(config.family).scheduler
    if c.kind == "steps":
        return GlanceSchedule.from_steps(scheduler, c.slow_steps, c.fast_steps, image_seq_len, c.base_steps,
                                         c.round_bf16)
    if c.kind == "uniform":
        return GlanceSchedule.uniform(scheduler, c.num_slow, c.num_fast, image_seq_len)
    if c.kind == "fitted":
        substeps = config.teacher.substeps
        states = trajectories.cached(run, trajectories.teacher_grid(None, scheduler, substeps, image_seq_len))
        return GlanceSchedule.fitted(scheduler, np.asarray(states), c.num_slow, c.num_fast, image_seq_len,
                                     substeps, c.split)
    raise GlanceError(f"config.schedule.kind {c.kind!r}: use 'steps', 'uniform' or 'fitted'")


def teacher_inputs(run):
    """What the train step reads besides the batch: "sigmas", the Glance points (then 0) and, for the teacher
    target, "states": the base's states there (trajectories, points, tokens, C), both padded to a multiple of
    16 points, so that schedules of up to 15 steps share one compiled train step, "texts": the captions they
    were drawn with (N, 1, ...) and "scales": their guidance scales."""
    sigmas = run.schedule.sigmas()
    if run.config.target != "teacher":
        return {"sigmas": jnp.asarray(_pad_points(sigmas)), "states": jnp.zeros((1, 1, 1, 1))}
    grid = trajectories.teacher_grid(run.schedule, families.get(run.config.family).scheduler,
                                     run.config.teacher.substeps, run.batch["x0"].shape[1])
    at = jnp.asarray([int(np.argmin(np.abs(grid - s))) for s in sigmas])
    states = trajectories.cached(run, grid)[:, at]
    return {"sigmas": jnp.asarray(_pad_points(sigmas)), "states": _pad_points(states, axis=1),
            "texts": run.batch["teacher_texts"], "scales": jnp.asarray(trajectories.trajectory_scales(run.config))}


def _pad_points(x, axis=0, multiple=16):
    """`x` with zeros appended along `axis` up to a multiple of 16 points (never indexed: padding only)."""
    pad = -x.shape[axis] % multiple
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return (jnp.pad if isinstance(x, jax.Array) else np.pad)(x, widths)


# ---- per phase: restore, loop, save ----

class Phase(NamedTuple):
    """One phase of a run, as its loop sees it."""

    name: str  # "slow" or "fast"
    points: jax.Array  # the mask of the phase's Glance points among teacher["sigmas"]
    key: jax.Array  # the phase's PRNG key: step k draws with fold_in(key, k)
    manager: Any  # its orbax CheckpointManager
    start: int  # the step it resumes from
    step_fn: Callable  # the compiled train step


def train_phase(run, name, teacher):
    """Trains phase `name`'s LoRA, from its newest checkpoint if it has one; returns the LoRA file."""
    phase, adapter, opt_state = restore(run, name, teacher)
    adapter, opt_state = loop(run, phase, teacher, adapter, opt_state)
    # Always from the final state (also when a restart finds the last checkpoint already written):
    # save_lora writes a temporary file and renames it, so the path holds a whole, finished LoRA or none.
    host_lora = multihost_utils.process_allgather(adapter, tiled=True)
    path = runstate.final_lora_path(run.workdir, name)
    if run.writer:
        lora.save_lora(host_lora, path, family=families.get(run.config.family), schedule=run.schedule,
                       guidance=guidance_regime(run.config))
    phase.manager.close()
    return path


def initial_state(run, phase, teacher):
    """(LoRA, optimizer state, points, key) with which `phase` starts: `points` masks the phase's timesteps
    among `teacher["sigmas"]` (a fixed shape), the key is the phase's."""
    config, n_slow = run.config, len(run.schedule.slow)
    chosen = range(n_slow) if phase == "slow" else range(n_slow, run.schedule.num_steps)
    points = jnp.asarray(np.isin(np.arange(teacher["sigmas"].shape[0]), list(chosen)), jnp.float32)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PHASES.index(phase))
    targets = config.lora.targets
    targets = targets if families.is_preset(targets) else [t.strip() for t in targets.split(",")]
    adapter = lora.init_lora(jax.random.fold_in(key, 1), run.params, targets, config.lora.rank,
                             float(config.lora.alpha))
    if config.student.guidance_input:
        adapter = families.get(config.family).add_guidance_embedder(jax.random.fold_in(key, 2), adapter, run.params)
    return adapter, optimizer(config.optim).init(adapter), points, key


def restore(run, name, teacher):
    """(Phase, LoRA, optimizer state) of phase `name` at its newest checkpoint that restores (or its start);
    the metrics after that step and a shorter run's final LoRA are dropped."""
    import orbax.checkpoint as ocp  # deferred: heavy, and only a training run needs it

    config = run.config
    adapter, opt_state, points, key = initial_state(run, name, teacher)
    shardings = None
    if run.mesh is not None:
        shardings = step_shardings(run, adapter, opt_state, teacher)
        adapter, opt_state = sharding.place((adapter, opt_state), shardings[0][:2])
    open_manager = lambda: ocp.CheckpointManager(
        os.path.join(run.workdir, "checkpoints", name),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True))
    template = {"lora": adapter, "opt_state": opt_state, "step": 0, "key": np.asarray(key)}
    manager, start, state = runstate.restore_latest(
        open_manager, lambda m, step: m.restore(step, args=ocp.args.StandardRestore(template)), run.writer)
    if state is not None:
        adapter, opt_state = state["lora"], state["opt_state"]
        if not np.array_equal(np.asarray(state["key"]), np.asarray(key)):
            raise GlanceError(f"{manager.directory}: checkpoints come from a run with another seed")
    runstate.check_resume_step(start, config.steps, manager.directory)
    if run.writer:
        _truncate_metrics(os.path.join(run.workdir, "metrics.jsonl"), name, start)
    lora_path = runstate.final_lora_path(run.workdir, name)
    if start < config.steps and run.writer and os.path.exists(lora_path):
        os.remove(lora_path)  # a shorter run's LoRA: while this one goes on, the final path holds none
    step_fn = make_train_step(run.model, config, run.static, shardings)
    return Phase(name, points, key, manager, start, step_fn), adapter, opt_state


def step_shardings(run, adapter, opt_state, teacher):
    """(in, out) shardings of the train step: the base, LoRA and Adam state by rule, the batch over data."""
    mesh, rep = run.mesh, sharding.replicated(run.mesh)
    lora_sh, opt_sh = sharding.tree_shardings(adapter, mesh), sharding.tree_shardings(opt_state, mesh)
    teacher_sh = jax.tree_util.tree_map(lambda _: rep, teacher)
    param_sh = jax.tree_util.tree_map(lambda x: x.sharding, run.params)
    return ((lora_sh, opt_sh, param_sh, batch_shardings(mesh, run.batch), teacher_sh, rep, rep),
            (lora_sh, opt_sh, {"loss": rep, "timestep": rep, "grad_norm": rep}))


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


def loop(run, phase, teacher, adapter, opt_state):
    """Steps `phase` from its start to config.steps, one metrics line a step, a checkpoint every
    checkpoint.every steps and at the last; returns the final (LoRA, optimizer state)."""
    config, lr = run.config, learning_rate(run.config.optim)
    bar = tqdm(range(phase.start, config.steps), initial=phase.start, total=config.steps, desc=f"{phase.name}-LoRA",
               unit="step", dynamic_ncols=True, disable=not run.writer)
    metrics_path = os.path.join(run.workdir, "metrics.jsonl")
    with safe_io.append_file(metrics_path) if run.writer else open(os.devnull, "a") as metrics:
        for step in bar:
            began = time.perf_counter()
            adapter, opt_state, out = phase.step_fn(adapter, opt_state, run.params, run.batch, teacher, phase.points,
                                                    jax.random.fold_in(phase.key, step))
            loss = float(out["loss"])
            if not np.isfinite(loss):
                last = phase.manager.latest_step()
                raise GlanceError(f"the {phase.name} loss became {loss} at step {step + 1}; stopped. The last good "
                                  f"checkpoint is {'step ' + str(last) if last else 'none'} in "
                                  f"{phase.manager.directory}")
            seconds = time.perf_counter() - began
            record = {"phase": phase.name, "step": step + 1, "loss": loss, "lr": float(lr(step)),
                      "timestep": float(out["timestep"]), "grad_norm": float(out["grad_norm"]),
                      "steps_per_sec": 1.0 / seconds}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{loss:.4f}", t=f"{record['timestep']:.0f}")
            if (step + 1) % config.checkpoint.every == 0 or step + 1 == config.steps:
                save_checkpoint(run, phase, step + 1, adapter, opt_state)
    return adapter, opt_state


def save_checkpoint(run, phase, step, adapter, opt_state):
    """Checkpoints `step` of `phase` and, before the last step, writes its LoRA beside it (a checkpoint's LoRA
    carries its step; the final path only ever holds a finished one, written from the final state)."""
    import orbax.checkpoint as ocp  # deferred, as in `restore`

    phase.manager.save(step, args=ocp.args.StandardSave(
        {"lora": adapter, "opt_state": opt_state, "step": step, "key": np.asarray(phase.key)}))
    phase.manager.wait_until_finished()
    if step == run.config.steps:
        return
    host_lora = multihost_utils.process_allgather(adapter, tiled=True)  # every process joins; one writes
    if run.writer:
        lora.save_lora(host_lora, runstate.intermediate_lora_path(run.workdir, phase.name, step),
                       family=families.get(run.config.family), schedule=run.schedule,
                       guidance=guidance_regime(run.config))
        runstate.prune_intermediate(run.workdir, phase.name, run.config.checkpoint.keep)


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
