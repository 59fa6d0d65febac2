"""`glance-jax demo --edit`: Glance on an editing model, on an embedded FLUX.1 Kontext-architecture teacher.

1. The edit teacher (edit_teacher.py: the text-to-image teacher's architecture as a Kontext model, trained to apply
   five exact pixel edits to a source digit on an all-MiniLM-L6-v2 instruction) is committed in diffusers layout; the
   demo converts it with the converter and loads the converted folder.
2. ONE edit (the first two of the data set, "mirror it left to right", and its mirrored image) distils Slow-LoRA /
   Fast-LoRA pairs: the text-to-image demo's teacher-target recipe (RECIPE: every Dense layer of the blocks,
   cached teacher trajectories drawn from the source, fitted K-step schedules) for K = 3, 4, 6, 10, the same on the
   paper's split, and the paper's data target (the edited image itself) on the paper's split.
3. Held-out sources (digits neither the teacher nor the sample saw) are edited by every method with every edit, on
   a trained phrasing other than the sample's and on a paraphrase the teacher never saw, with fixed seeds; each
   edit is compared with the teacher's 50-step edit from the same noise (PSNR, also on the training edit) and with
   the exact edit (PSNR: edit accuracy). Glance rows get the base's equivalent evaluations and the speed-up as in
   the text-to-image demo. Writes metrics.json and grid.png (source | exact | teacher | base | glance) to the work
   dir and prints the table.

This module builds on the text-to-image demo (its recipe, budget, rows and speed-ups); the demo's `main` hands it
itself (`t2i`), so that neither module imports the other's package in a cycle.
"""

import os
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image

from glance_jax import checkpoints, data, evaluation, families, safe_io, train, validation
from glance_jax.checkpoints import safetensors_io
from glance_jax.demo import edit_teacher
from glance_jax.errors import GlanceError
from glance_jax.layout import unpack_latents
from glance_jax.lora import load_lora
from glance_jax.pipelines import GlancePipeline

FAMILY = edit_teacher.FAMILY
SIZE = 8
TRAIN_DIGIT, TRAIN_EDIT = 2, "mirror"  # the one sample: the first two of the data set, mirrored
TRAIN_INSTRUCTION = edit_teacher.trained_phrasings(TRAIN_EDIT)[0]
UNGUIDED_K = (3, 4, 6, 10)
# More base rows, beyond the compared K: the edit teacher's sampling is nearly deterministic, so the base converges
# fast and the Glance rows pass base-uniform-10; these let their equivalent evaluations be interpolated further
# rather than extrapolated.
CALIBRATION_K = (20, 30)
# Reported: on every edit, the second trained phrasing and the first unseen paraphrase; sources: the first held-out
# image of each digit in the first half of the held-out images. Validation (`--validation`, what was tuned on): the
# first trained phrasing (but the sample's own) and the second unseen paraphrase, sources from the second half,
# other seeds.
VALIDATION_SEED = 10000


def instructions(validation):
    """[(instruction, kind)] of the held-out (or validation) set, kind "trained" or "unseen" (by the teacher)."""
    i = 0 if validation else 1
    out = []
    for name in edit_teacher.NAMES:
        trained, unseen = edit_teacher.trained_phrasings(name)[i], edit_teacher.unseen_phrasings(name)[1 - i]
        if trained != TRAIN_INSTRUCTION:
            out.append((trained, "trained"))
        out.append((unseen, "unseen"))
    return out


def sources(validation, count):
    """(images (count, 8, 8, 1), labels): the first held-out image of digits 0, 1, ... in the set's half."""
    _, images, labels = edit_teacher.split()
    half = len(images) // 2
    images, labels = (images[half:], labels[half:]) if validation else (images[:half], labels[:half])
    first = [int(np.nonzero(labels == d)[0][0]) for d in range(count)]
    return images[first], labels[first]


def write_sample(folder, prompts):
    """The one edit, laid out as configs/flux_kontext.py reads it: edited/two.png + two.txt + two.safetensors (the
    encodings: pixels as latents, the instruction's and the empty one's), source/two.png. Returns the source."""
    images, labels = edit_teacher.t2i.digits()
    source = images[int(np.nonzero(labels == TRAIN_DIGIT)[0][0])]
    edited = edit_teacher.apply_edit(TRAIN_EDIT, source[None])[0]
    for sub, image in (("edited", edited), ("source", source)):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        safe_io.save_image(Image.fromarray(evaluation.to_uint8(image)[..., 0]), os.path.join(folder, sub, "two.png"),
                           "PNG")
    with safe_io.atomic_file(os.path.join(folder, "edited", "two.txt"), "w") as f:
        f.write(TRAIN_INSTRUCTION)
    (states, pooled), (empty_states, empty_pooled) = prompts[TRAIN_INSTRUCTION], prompts[""]
    safetensors_io.save_file({"latents": edited, data.source_key(0): source, "prompt_embeds": states,
                              "pooled_prompt_embeds": pooled, "empty_prompt_embeds": empty_states,
                              "empty_pooled_prompt_embeds": empty_pooled},
                             os.path.join(folder, "edited", "two.safetensors"), {data.SCALE_KEY: "1"})
    return source


def edit_config(t2i, demo, k, target, schedule, steps):
    """The trainer's config for one pair: the text-to-image demo's recipes (t2i.lora_config) on the Kontext family,
    the sample's source image beside it."""
    b = demo.budget
    c = train.default_config(FAMILY.name, "both")
    c.seed, c.target, c.steps = demo.args.seed, target, steps
    c.model.path, c.model.dtype, c.model.guidance = demo.model_dir, "fp32", 1.0
    c.data.dir, c.data.sources = os.path.join(demo.sample_dir, "edited"), (os.path.join(demo.sample_dir, "source"),)
    c.data.resolution, c.data.multiple = SIZE, 2
    c.data.cache_dir = os.path.join(demo.workdir, "cache")
    if target == "data":  # the paper's recipe scaled to the small model, as the text-to-image demo's
        c.lora.rank, c.lora.alpha, c.optim.lr = 4, 16.0, 1e-4
    else:
        c.lora.targets = f"{FAMILY.name}-all"  # RECIPE's: every Dense layer of the blocks
        c.lora.rank, c.lora.alpha, c.optim.lr = t2i.RECIPE["rank"], t2i.RECIPE["alpha"], t2i.RECIPE["lr"]
    if schedule == "official":
        c.schedule.kind = "steps"
    else:
        c.schedule.kind, c.schedule.num_slow, c.schedule.num_fast = schedule, k // 2, k - k // 2
    c.teacher.trajectories = c.teacher.batch = b.trajectories
    c.teacher.guidance_scale, c.teacher.substeps = 1.0, b.substeps
    c.checkpoint.every = steps
    return c


def lora_pairs(t2i, demo):
    b, schedule = demo.budget, demo.args.schedule
    pairs = [(f"glance-{k}", edit_config(t2i, demo, k, "teacher", schedule, b.steps)) for k in UNGUIDED_K]
    pairs += [("glance-official-10", edit_config(t2i, demo, 10, "teacher", "official", b.steps)),
              ("glance-data-10", edit_config(t2i, demo, 10, "data", "official", b.data_steps))]
    return pairs


def converted_teacher(workdir, again):
    """The embedded edit teacher converted into workdir/edit_teacher_flax (kept between runs)."""
    model_dir = os.path.join(workdir, "edit_teacher_flax")
    if again or not os.path.isdir(model_dir):
        checkpoints.convert_checkpoint(edit_teacher.TEACHER_DIR, model_dir, families.CLASSES, dtype="fp32",
                                       overwrite=True)
    return model_dir


class EditBatch:
    """Every image every method samples, in one batch: held-out sources x instructions, then the training edit."""

    def __init__(self, args, prompts, train_source, count, train_seeds):
        self.instructions = instructions(args.validation)
        srcs, self.labels = sources(args.validation, count)
        first = VALIDATION_SEED if args.validation else args.seed * 1000
        pairs = [(s, j) for j in range(len(self.instructions)) for s in range(count)]
        self.held_out = len(pairs)
        self.instruction_of = np.array([j for _, j in pairs])
        self.kind_of = np.array([self.instructions[j][1] for _, j in pairs])
        self.edit_of = np.array([edit_teacher.edit_of(self.instructions[j][0]) for _, j in pairs])
        self.source_of = np.array([s for s, _ in pairs])
        texts = [self.instructions[j][0] for _, j in pairs] + [TRAIN_INSTRUCTION] * train_seeds
        src = np.concatenate([srcs[self.source_of], np.repeat(train_source[None], train_seeds, 0)])
        truth = [edit_teacher.apply_edit(e, srcs[s][None])[0] for s, e in zip(self.source_of, self.edit_of)]
        self.truth = np.stack(truth + [edit_teacher.apply_edit(TRAIN_EDIT, train_source[None])[0]] * train_seeds)
        self.sources = src
        self.seeds = [first + i for i in range(self.held_out)] + [first + 500 + i for i in range(train_seeds)]
        self.encodings = {"prompt_embeds": jnp.asarray(np.stack([prompts[t][0] for t in texts])),
                          "pooled_prompt_embeds": jnp.asarray(np.stack([prompts[t][1] for t in texts])),
                          "image_latents": (jnp.asarray(src),)}


def edit_sampler(base):
    """The sampler of the Kontext teacher; each edit's source comes as latents in the encodings (`image_latents`)."""
    return GlancePipeline(*base, edit_teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1, family=FAMILY)


def sample(pipe, batch, **kwargs):
    return pipe.sample(batch.encodings, height=SIZE, width=SIZE, seed=batch.seeds, **kwargs)


def table_methods(t2i, args, trained, pipe):
    method = t2i.method

    def glance(name, schedule_kind, target):
        files, schedule = trained[name]
        return method(name, "glance", schedule_kind, target, 1.0, "teacher-50", schedule.num_steps,
                      schedule=schedule, slow_lora=load_lora(files["slow"], pipe.params),
                      fast_lora=load_lora(files["fast"], pipe.params))

    methods = [method("teacher-50", "base", "uniform", None, 1.0, "teacher-50", 50, num_inference_steps=50)]
    methods += [method(f"base-uniform-{k}", "base", "uniform", None, 1.0, "teacher-50", k, num_inference_steps=k)
                for k in sorted(UNGUIDED_K + CALIBRATION_K, reverse=True)]
    if args.schedule == "fitted":
        methods += [method(f"base-fitted-{k}", "base", "fitted", None, 1.0, "teacher-50", k,
                           schedule=trained[f"glance-{k}"][1]) for k in (6, 4)]
    methods += [glance(f"glance-{k}", args.schedule, "teacher") for k in sorted(UNGUIDED_K, reverse=True)]
    methods += [glance("glance-official-10", "official", "teacher"), glance("glance-data-10", "official", "data")]
    return methods


def evaluate(t2i, methods, pipe, batch):
    """(rows, {name: held-out images}): every method's edits of the batch, timed (a second call where the first
    compiled), against the teacher's 50-step edits from the same noise and against the exact edits."""
    n = batch.held_out
    results, images, own_images = [], {}, {}
    for m in methods:
        kwargs = dict(m.pop("kwargs"))
        latents, seconds = t2i.timed(lambda: sample(pipe, batch, **kwargs).block_until_ready())
        both = np.clip(np.asarray(unpack_latents(latents, SIZE, SIZE, 1)), -1, 1)
        out, own = both[:n], both[n:]
        images[m["name"]], own_images[m["name"]] = out, own
        reference, own_reference = images[m["reference"]], own_images[m["reference"]]
        if pipe.last_nfe != m["nfe"]:
            raise AssertionError(f"{m['name']}: {pipe.last_nfe} passes counted, {m['nfe']} expected")
        if "schedule" in kwargs:
            m["timesteps"] = list(kwargs["schedule"].slow + kwargs["schedule"].fast)
        truth = batch.truth[:n]
        by_kind = {k: evaluation.psnr(out[batch.kind_of == k], reference[batch.kind_of == k])
                   for k in ("trained", "unseen")}
        results.append({**m, "steps": m["nfe"], "sec_per_image": seconds / len(both),
                        "psnr_vs_teacher": evaluation.psnr(out, reference),
                        "psnr_train_edit": evaluation.psnr(own, own_reference),
                        "psnr_by_template": by_kind, "mse_vs_teacher": evaluation.mse(out, reference),
                        "psnr_vs_truth": evaluation.psnr(out, truth),
                        "psnr_train_edit_vs_truth": evaluation.psnr(own, batch.truth[n:]),
                        "psnr_vs_truth_by_edit": {e: evaluation.psnr(out[batch.edit_of == e], truth[batch.edit_of == e])
                                                  for e in edit_teacher.NAMES}})
    t2i.add_speedups(results)
    return results, images


def write_report(t2i, demo, results, images, batch):
    args, b = demo.args, demo.budget
    report = {"methods": results, "seed": args.seed, "validation": args.validation, "quick": args.quick,
              "train_sample": {"instruction": TRAIN_INSTRUCTION, "edit": TRAIN_EDIT,
                               "source": os.path.join(demo.sample_dir, "source", "two.png"),
                               "image": os.path.join(demo.sample_dir, "edited", "two.png")},
              "instructions": [{"instruction": t, "kind": k, "edit": edit_teacher.edit_of(t)}
                               for t, k in batch.instructions],
              "images_per_method": batch.held_out, "train_edit_images": len(batch.seeds) - batch.held_out,
              "lora_steps": b.steps, "data_lora_steps": b.data_steps, "trajectories": b.trajectories,
              "recipe": t2i.RECIPE,
              "by_template": [t2i.template_line(results, "glance-6", "base-uniform-10")],
              "closing": [t2i.closing_line(results, "edit", "base-uniform-10", "glance-")]}
    safe_io.write_json(os.path.join(demo.workdir, "metrics.json"), report, indent=2)
    # columns: one held-out source for each instruction; rows: source, exact edit, then the methods
    columns = [int(np.nonzero(batch.instruction_of == j)[0][j % len(batch.labels)])
               for j in range(len(batch.instructions))]
    shown = [m["name"] for m in results if m["name"] in ("teacher-50", "base-uniform-4", "base-uniform-6")
             or m["kind"] == "glance"]
    rows = [[batch.sources[i] for i in columns], [batch.truth[i] for i in columns]]
    rows += [[images[name][i] for i in columns] for name in shown]
    labels = [f"{batch.edit_of[i].replace('-', chr(10))}\n{batch.kind_of[i]}" for i in columns]
    grid = evaluation.grid(rows, ["source", "exact edit"] + shown, labels, scale=5)
    safe_io.save_image(grid, os.path.join(demo.workdir, "grid.png"), "PNG")
    return report


def print_table(demo, report, seconds):
    args, b, workdir = demo.args, demo.budget, demo.workdir
    which = "validation" if args.validation else "held-out"
    print(f"\nGlance edit demo: {report['images_per_method']} {which} edits per method (seed {args.seed}: "
          f"{len(report['instructions'])} instructions x {report['images_per_method'] // len(report['instructions'])} "
          f"sources); LoRAs from one edit, '{TRAIN_INSTRUCTION}' on a {TRAIN_DIGIT}, {b.steps} steps a phase "
          f"(data target {b.data_steps})")
    print(f"{'method':<20}{'NFE':>5}{'ms/img':>8}{'PSNR dB':>9}{'train':>8}{'exact dB':>10}{'eq. NFE':>9}"
          f"{'speed-up':>10}")
    for m in report["methods"]:
        eq = (f"{m['equivalent_base_nfe']:>8.1f}{'*' if m['extrapolated'] else ' '}{m['speedup']:>9.2f}x"
              if m["kind"] == "glance" else "")
        print(f"{m['name']:<20}{m['nfe']:>5}{1e3 * m['sec_per_image']:>8.2f}{m['psnr_vs_teacher']:>9.2f}"
              f"{m['psnr_train_edit']:>8.2f}{m['psnr_vs_truth']:>10.2f}{eq}")
    teacher = next(m for m in report["methods"] if m["name"] == "teacher-50")
    print("teacher-50 edit accuracy by edit (dB vs the exact edit): " + "; ".join(
        f"{e} {v:.2f}" for e, v in teacher["psnr_vs_truth_by_edit"].items()))
    print("\n".join(report["by_template"] + report["closing"]))
    print(f"(PSNR: against teacher-50's edit from the same noise, on {which} sources and instructions, and on the "
          f"training edit; exact: against the exact edit (edit accuracy); by template: trained = a phrasing the "
          f"teacher trained on, unseen = a paraphrase it never saw; eq. NFE: base-uniform evaluations giving the "
          f"same PSNR, log-interpolated; *: extrapolated beyond the base rows)\n"
          f"wrote {workdir}/metrics.json and {workdir}/grid.png in {seconds:.0f} s")


def main(args, t2i):
    """The edit demo for the demo's parsed `args`; `t2i`: the text-to-image demo module (glance_jax.demo)."""
    if args.all:
        raise GlanceError("--all adds the guided text-to-image rows; the edit demo has none: leave it out with --edit")
    workdir = validation.output_folder(args.workdir)
    validation.fresh_outputs(workdir, ("metrics.json", "grid.png"), args.overwrite)
    if args.retrain_teacher:
        edit_teacher.train_teacher(seed=args.seed)
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    b = t2i.budget(args)
    demo = t2i.Demo(args, b, workdir, converted_teacher(workdir, args.retrain_teacher), os.path.join(workdir, "sample"),
                    os.path.join(workdir, "loras"))
    prompts = edit_teacher.load_prompts()
    train_source = write_sample(demo.sample_dir, prompts)
    pairs = lora_pairs(t2i, demo)
    base = train.load_base(pairs[0][1])
    batch = EditBatch(args, prompts, train_source, 5 if args.quick else 10, b.train_seeds)
    print(f"distilling {len(pairs)} LoRA pairs from '{TRAIN_INSTRUCTION}' on one {TRAIN_DIGIT}")
    trained = {}
    for name, c in pairs:
        run = t2i.prepare_run(c, os.path.join(demo.loras_dir, name), base)
        print(f"distilling {name}: {c.target} target, {c.steps} steps a phase")
        trained[name] = train.train_phases(run), run.schedule
    pipe = edit_sampler(base)
    results, images = evaluate(t2i, table_methods(t2i, args, trained, pipe), pipe, batch)
    report = write_report(t2i, demo, results, images, batch)
    print_table(demo, report, time.perf_counter() - started)
    return 0

