"""Quality on a quantized base, on the embedded demo teacher: fp32 against fp8 and int8 kernels.

For each base (the teacher loaded with quantize = none, fp8, int8; fp32 compute):
1. the base's own 50-step images of the held-out prompts, against the unquantized teacher's (PSNR, MSE):
   what quantizing the teacher alone costs;
2. Slow + Fast LoRAs distilled on that base from the demo's one training image (data and teacher
   targets, the demo's recipe: rank 4, alpha 16, AdamW 1e-4, 60 steps a phase, the 10-step Glance schedule), then
   sampled on the same base in 10 steps, measured as the demo measures (PSNR / MSE against the unquantized
   teacher's 50 steps, prompt fidelity of a digit classifier, Frechet distance of its features to real
   digits), and PSNR against the same base's own 50 steps;
3. the mismatch the wider ecosystem warns about: the LoRAs trained on the fp32 base, sampled on the
   quantized one.
No value was tuned here: the recipe is the demo's, the held-out prompts are the demo's (the other digits in
two phrasings), seeds 0-99, training seed 0.

    python benchmarks/quantized_quality.py   # about 4 minutes on 2 CPU cores
"""

import json
import os
import shutil
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from PIL import Image

from glance_jax import data, evaluation, families
from glance_jax.checkpoints import safetensors_io
from glance_jax.demo import teacher
from glance_jax.lora import load_lora
from glance_jax.layout import unpack_latents
from glance_jax.pipelines import FluxGlancePipeline
from glance_jax.schedules import GlanceSchedule
from glance_jax.train import default_config, prepare, train_phases

SIZE, SLOW, FAST = 8, (1, 3, 5, 7, 9), (11, 21, 31, 41, 50)
TRAIN = (7, "a handwritten seven")
TEMPLATES = ("the numeral {word}, written by hand", "the number {word}")
BASES = ("none", "fp8", "int8")
TARGETS = ("data", "teacher")


def write_sample(folder, prompts):
    images, labels = teacher.digits()
    image = images[int(np.nonzero(labels == TRAIN[0])[0][0])]
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(evaluation.to_uint8(image)[..., 0]).save(os.path.join(folder, "seven.png"))
    with open(os.path.join(folder, "seven.txt"), "w") as f:
        f.write(TRAIN[1])
    states, pooled = prompts[TRAIN[1]]
    safetensors_io.save_file({"latents": image, "prompt_embeds": states, "pooled_prompt_embeds": pooled},
                             os.path.join(folder, "seven.safetensors"), {data.SCALE_KEY: "1"})  # the teacher's pixels


def train(sample_dir, workdir, quantize, target):
    c = default_config("flux", "both")
    c.seed, c.target, c.steps = 0, target, 60
    c.model.path, c.model.dtype, c.model.quantize = teacher.TEACHER_DIR, "fp32", quantize
    c.data.dir, c.data.resolution, c.data.multiple = sample_dir, SIZE, 2
    c.data.cache_dir = os.path.join(workdir, "cache")
    c.lora.rank, c.lora.alpha = 4, 16.0
    c.optim.lr = 1e-4
    c.schedule.slow_steps, c.schedule.fast_steps = SLOW, FAST
    c.teacher.trajectories = 8
    c.checkpoint.every = c.steps
    return train_phases(prepare(c, os.path.join(workdir, f"loras-{quantize}-{target}")))


def classifier():
    from sklearn.neural_network import MLPClassifier
    images, labels = teacher.digits()
    flat = images.reshape(len(images), -1)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0).fit(flat, labels)
    features = lambda x: np.maximum(x.reshape(len(x), -1) @ clf.coefs_[0] + clf.intercepts_[0], 0)
    return (lambda x: clf.predict(x.reshape(len(x), -1))), features, features(images)


def main():
    prompts = teacher.load_prompts()
    captions = [t.format(word=w) for t in TEMPLATES for w in teacher.WORDS if t.format(word=w) != TRAIN[1]]
    batch = [c for c in captions for _ in range(5)]
    labels = np.array([teacher.WORDS.index(next(w for w in teacher.WORDS if f" {w}" in c)) for c in batch])
    seeds = list(range(len(batch)))
    embeds = jnp.asarray(np.stack([prompts[c][0] for c in batch]))
    pooled = jnp.asarray(np.stack([prompts[c][1] for c in batch]))
    schedule = GlanceSchedule.from_steps(teacher.SCHEDULER, SLOW, FAST, image_seq_len=(SIZE // 2) ** 2)
    predict, features, real = classifier()
    work = tempfile.mkdtemp(prefix="glance_quant_quality_")
    try:
        write_sample(os.path.join(work, "sample"), prompts)
        loras = {(q, t): train(os.path.join(work, "sample"), work, q, t) for q in BASES for t in TARGETS}
        pipes = {}
        for q in BASES:
            model, params = families.load_model(teacher.TEACHER_DIR, quantize=q)
            pipes[q] = FluxGlancePipeline(model, params, teacher.SCHEDULER, latent_channels=1, vae_scale_factor=1)

        def images(q, **kw):
            latents = pipes[q](embeds, pooled, height=SIZE, width=SIZE, seed=seeds, lora_mode="unmerged", **kw)
            return np.clip(np.asarray(unpack_latents(latents, SIZE, SIZE, 1)), -1, 1)

        def lora(q, trained_on, target):
            files = loras[(trained_on, target)]
            return dict(schedule=schedule, slow_lora=load_lora(files["slow"], pipes[q].params),
                        fast_lora=load_lora(files["fast"], pipes[q].params))

        teacher50 = {q: images(q, num_inference_steps=50) for q in BASES}
        rows = []
        for q in BASES:
            label = "fp32" if q == "none" else q
            runs = [(f"{label} teacher-50", teacher50[q])]
            for t in TARGETS:
                runs.append((f"{label} glance-{t}-10, LoRA trained on {label}", images(q, **lora(q, q, t))))
                if q != "none":
                    runs.append((f"{label} glance-{t}-10, LoRA trained on fp32", images(q, **lora(q, "none", t))))
            for name, out in runs:
                rows.append({"name": name, "base": q,
                             "psnr_vs_fp32_teacher50": evaluation.psnr(out, teacher50["none"]),
                             "mse_vs_fp32_teacher50": evaluation.mse(out, teacher50["none"]),
                             "psnr_vs_own_teacher50": evaluation.psnr(out, teacher50[q]),
                             "fidelity": float(np.mean(predict(out) == labels)),
                             "fd": evaluation.frechet_distance(features(out), real)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(batch)} held-out images a row (seeds 0-{len(batch) - 1}); LoRAs from '{TRAIN[1]}'")
    print(f"{'run':<44}{'PSNR vs fp32-50':>16}{'MSE':>9}{'PSNR vs own-50':>15}{'fidelity':>10}{'FD':>7}")
    for r in rows:
        print(f"{r['name']:<44}{r['psnr_vs_fp32_teacher50']:>16.2f}{r['mse_vs_fp32_teacher50']:>9.4f}"
              f"{r['psnr_vs_own_teacher50']:>15.2f}{r['fidelity']:>10.2f}{r['fd']:>7.2f}")
    print(json.dumps({"benchmark": "quantized_quality", "rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
