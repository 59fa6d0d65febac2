"""The trainer's config schema: every field once, with its default, its check and whether it shapes the result.

`FIELDS` is the one table. `default_config(family, phase)` builds the
ml_collections config from it (a family's official recipe, from
`glance_jax.families`, gives the LoRA rank, the learning rate and the caption
dropout), `check(config)` runs every field's check before anything loads, and
`fingerprinted(config)` gives the fields a run's resume fingerprint records
(glance_jax.runstate): all but those marked `fingerprinted=False`, each with
its reason. The files in configs/ start from `default_config` and set only
what their recipe changes.
"""

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from glance_jax import checkpoints, families, schedules, sharding, validation
from glance_jax.errors import GlanceError
from glance_jax.modules.layers import REMAT_POLICIES

PHASES = ("slow", "fast")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field. `default`: a value, or a function of the `families.Family` the config is for.
    `check(name, value, config)` raises one GlanceError for a bad value (None: any value goes)."""

    name: str  # dotted, e.g. "optim.lr"
    default: Any
    check: Callable = None
    doc: str = ""
    fingerprinted: bool = True  # False: left out of the resume fingerprint, for the reason `because` gives
    because: str = ""

    def __post_init__(self):
        assert self.fingerprinted or self.because, f"{self.name}: say why it is not fingerprinted"


# ---- checks: validation's, on a field's value (and the fields it depends on) ----

def _value(check, *args):
    """A check of the value alone, by one of validation's (`positive_int`, `one_of`, ...)."""
    return lambda name, value, config: check(name, value, *args)


def _when(condition, check):
    """`check` only for configs where `condition(config)` holds."""
    return lambda name, value, config: check(name, value, config) if condition(config) else None


def _required(name, value, config):
    if not value:
        raise GlanceError(f"{name} is not set (pass --{name}=...)")


def _optional_number(name, value, config):
    if value is not None:
        validation.finite_number(name, value)


def _resolution(name, value, config):
    validation.multiple_of(name, value, config.data.multiple)


def _sources(name, value, config):
    """An editing family's source-image folders: one to as many as it takes; none for a text-to-image family."""
    family = families.get(config.family)
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise GlanceError(f"{name} {value!r}: a tuple of folders, e.g. ('~/edit/source',)")
    if family.reference_images and not 1 <= len(value) <= family.reference_images:
        raise GlanceError(f"{name}: {family.name} edits 1 to {family.reference_images} source image(s), one folder "
                          f"each; {len(value)} given")
    if value and not family.reference_images:
        raise GlanceError(f"{name}: {family.name} is no editing model; leave it empty")


def _weight_decay(name, value, config):
    validation.finite_number(name, value)
    if value < 0:
        raise GlanceError(f"{name} {value!r}: must be >= 0")


def _schedule_steps(name, value, config):
    steps, base_steps = tuple(value), config.schedule.base_steps
    if not steps or any(not isinstance(s, int) or not 1 <= s <= base_steps for s in steps):
        raise GlanceError(f"{name} {steps!r}: 1-based steps of the {base_steps}-step schedule")


def _captions(name, value, config):
    if isinstance(value, str) or any(not isinstance(p, str) or not p.strip() for p in value):
        raise GlanceError(f"{name} {value!r}: a list of non-empty captions")


def _caption_dropout(name, value, config):
    validation.fraction(name, value)
    if config.student.guidance_scale > 1 and config.target == "teacher" and value > 0:
        raise GlanceError(f"{name} {value!r} with config.student.guidance_scale > 1: the teacher target's negative "
                          "pass already trains the empty prompt; set it to 0")


def _student_negative(name, value, config):
    if config.student.guidance_scale > 1 and (not isinstance(value, str) or value.strip()):
        raise GlanceError(f"{name} {value!r}: only the empty prompt is supported (the sample's empty_prompt_embeds)")


def _guidance_input(name, value, config):
    if value and (config.target != "teacher" or config.student.guidance_scale != 1):
        raise GlanceError(f"{name}: a one-pass student of the teacher target (config.target=teacher, "
                          "config.student.guidance_scale=1)")


def _guidance_range(name, value, config):
    scales, scale = tuple(value), config.teacher.guidance_scale
    if not config.student.guidance_input:
        if scales:
            raise GlanceError(f"{name} {scales!r}: only for config.student.guidance_input")
        return
    numbers = all(isinstance(x, (int, float)) and math.isfinite(x) for x in scales)
    if (len(scales) != 2 or not numbers or not 1 <= scales[0] < scales[1] or not scales[0] <= scale <= scales[1]
            or scale <= 1):
        raise GlanceError(f"{name} {scales!r}: two scales 1 <= low < high around config.teacher.guidance_scale "
                          f"({scale!r}, > 1), for config.student.guidance_input")


def _mesh(name, value, config):
    if value:
        sharding.parse_mesh(value)


_fitted_or_uniform = lambda c: c.schedule.kind != "steps"
_integrates = lambda c: c.target == "teacher" or c.schedule.kind == "fitted"  # both integrate the base's trajectories


# ---- the table ----

_IDENTITY = "its files' identity is fingerprinted instead (runstate.path_identity): a moved base is the same base"
_RESUMABLE = "where a run can resume, not what it computes: a resumed run ends bit for bit as an uninterrupted one"

FIELDS = (
    Field("family", lambda f: f.name, _value(validation.one_of, families.NAMES),
          "the model family (glance_jax.families): its official recipe gives the defaults marked so below"),
    Field("phase", "both", _value(validation.one_of, (*PHASES, "both")), "the LoRA(s) this invocation trains",
          fingerprinted=False, because="each phase has its own checkpoints and LoRA file"),
    Field("target", "data", _value(validation.one_of, ("data", "teacher")),
          "data: the sample's straight-line velocity (the paper); teacher: the base's own trajectory"),
    Field("steps", 60, _value(validation.positive_int), "train steps a phase", fingerprinted=False,
          because="it sets how far a run goes, not its steps: the learning rate does not depend on it, so a longer "
          "run extends a shorter one step for step (a checkpoint beyond it is refused, runstate.check_resume_step)"),
    Field("seed", 0, _value(validation.seed), "the noise, timestep, caption-dropout and LoRA-init draws"),

    Field("model.path", "", _required, "any checkpoint glance-jax loads: diffusers folder, BFL file, converted "
          "folder", fingerprinted=False, because=_IDENTITY),
    Field("model.vae_path", "", None, "the VAE folder (e.g. FLUX.1-dev/vae): encodes the image; empty: latents "
          "precomputed (or the pipeline folder's)", fingerprinted=False, because=_IDENTITY),
    Field("model.text_encoder_path", "", None, "the pipeline folder with text_encoder(s) and tokenizer(s); empty: "
          "precomputed (or the pipeline folder's)", fingerprinted=False, because=_IDENTITY),
    Field("model.dtype", "bf16", _value(validation.one_of, tuple(checkpoints.DTYPES)),
          "the frozen base; LoRA and optimizer state are always fp32"),
    # "none": a base in model.dtype, which keeps small fp32 runs exact; the official code trains on an
    # optimum-quanto qfloat8 (fp8) transformer, and so do the official configs in configs/
    Field("model.quantize", "none", _value(validation.one_of, ("none", "fp8", "int8")),
          "fp8 or int8: 8-bit Dense kernels, one scale per output channel (glance_jax/quantize.py)"),
    Field("model.remat_policy", "none", _value(validation.one_of, tuple(REMAT_POLICIES)),
          "what the backward pass recomputes instead of storing (glance_jax.modules.layers)"),
    Field("model.guidance", 1.0, _optional_number,
          "FLUX.1-dev's guidance input during training, as the official code passes it"),

    Field("data.dir", "", _required, "the folder of the one image with its same-name .txt caption",
          fingerprinted=False, because="the sample's content is fingerprinted instead (runstate.sample_identity)"),
    Field("data.sources", (), _sources, "an editing model's source images: folders, one per source image, each "
          "holding it under the edited image's name", fingerprinted=False,
          because="the source images' content is fingerprinted with the sample's (runstate.sample_identity)"),
    Field("data.multiple", 32, _value(validation.positive_int),
          "crop to a multiple of this many pixels (and of the model's 2 x 2 patch, checked once it is known)"),
    Field("data.resolution", 1024, _resolution, "the long side in pixels"),
    Field("data.caption_dropout", lambda f: f.recipe.caption_dropout, _caption_dropout,
          "probability of training on the empty prompt; the family's recipe"),
    Field("data.cache_dir", "", None, "encoded samples and teacher trajectories; empty: ~/.cache/glance_jax",
          fingerprinted=False, because="where encodings are kept, not what they are: entries are keyed by content"),

    Field("lora.targets", lambda f: f.name, None,
          "a preset (glance_jax.families.lora_preset), or a comma-separated list of module names"),
    Field("lora.rank", lambda f: f.recipe.rank, _value(validation.positive_int), "the family's recipe"),
    Field("lora.alpha", lambda f: 4.0 * f.recipe.rank, _value(validation.positive_number),
          "4 x the recipe's rank: the official scale alpha / r = 4"),

    Field("optim.lr", lambda f: f.recipe.lr, _value(validation.positive_number), "AdamW; the family's recipe"),
    Field("optim.warmup_steps", 10, _value(validation.non_negative_int),
          "linear from 0, then constant (diffusers' constant_with_warmup)"),
    Field("optim.b1", 0.9, _value(validation.fraction), "Adam's beta 1"),
    Field("optim.b2", 0.999, _value(validation.fraction), "Adam's beta 2"),
    Field("optim.eps", 1e-8, _value(validation.positive_number), "Adam's epsilon"),
    Field("optim.weight_decay", 0.01, _weight_decay, "AdamW's, diffusers' training default"),
    Field("optim.grad_clip", 1.0, _value(validation.positive_number), "global-norm clipping, diffusers' default"),
    Field("optim.state_dtype", "fp32", _value(validation.one_of, ("fp32", "bf16")),
          "Adam's moments; bf16 halves them (the official Qwen-Image config: 8-bit Adam)"),

    # "steps": slow_steps / fast_steps, 1-based steps of the base_steps-step schedule at the sample's size (the
    # paper); "uniform": the base's own (num_slow + num_fast)-step schedule, first num_slow steps slow;
    # "fitted": num_slow + num_fast points of the teacher.substeps grid fitted to the teacher's trajectories
    Field("schedule.kind", "steps", _value(validation.one_of, ("steps", "uniform", "fitted")),
          "how the Glance points are chosen"),
    Field("schedule.num_slow", 5, _when(_fitted_or_uniform, _value(validation.positive_int)),
          "slow points, for uniform and fitted"),
    Field("schedule.num_fast", 5, _when(_fitted_or_uniform, _value(validation.positive_int)),
          "fast points, for uniform and fitted"),
    Field("schedule.split", "half", None,
          "fitted: the slow/fast boundary halfway, or at an SNR threshold (a number as a string)"),
    Field("schedule.base_steps", 50, _value(validation.positive_int), "the schedule slow_steps and fast_steps index"),
    Field("schedule.slow_steps", schedules.OFFICIAL_SLOW_STEPS, _schedule_steps, "steps: the paper's slow steps"),
    Field("schedule.fast_steps", schedules.OFFICIAL_FAST_STEPS, _schedule_steps, "steps: the paper's fast steps"),
    Field("schedule.round_bf16", False, None, "timesteps rounded to bf16, as the official code stores them"),

    # only for target "teacher" (and the fitted schedule, which fits points to the same trajectories)
    Field("teacher.trajectories", 4, _when(_integrates, _value(validation.positive_int)),
          "noise seeds whose teacher trajectories are integrated once, then reused"),
    Field("teacher.substeps", 50, _when(_integrates, _value(validation.positive_int)),
          "the base integrates on this fine grid (plus the Glance points)"),
    Field("teacher.batch", 8, _when(_integrates, _value(validation.positive_int)),
          "noises integrated per compiled call"),
    Field("teacher.guidance_scale", 1.0, _when(_integrates, _value(validation.positive_number)),
          "> 1: guided trajectories (true CFG; FLUX.1-dev: its guidance input)"),
    Field("teacher.negative_prompt", " ", None,
          "CFG's negative: the sample's empty-prompt encoding, the one supported (checked where it is used)"),
    Field("teacher.guidance_range", (), _guidance_range,
          "(low, high): trajectory k is guided at low + (high - low) k / (trajectories - 1) instead"),
    # a guided student then learns guidance for more than one prompt
    Field("teacher.prompts", (), _when(_integrates, _captions),
          "more captions (no images) whose trajectories join the caption's: trajectory k has caption k mod (1 + n)"),
    Field("teacher.minibatch", 1, _when(_integrates, _value(validation.positive_int)),
          "(trajectory, point) draws averaged in one step; > 1 for guided trajectories"),

    # how the trained pair samples. A scale > 1: true CFG at it, two LoRA'd passes a step (the caption and the
    # negative prompt), as the official Glance-Qwen pipeline samples; the teacher target then matches that
    # combination to the guided teacher's jump. 1: one pass a step (a guided teacher's guidance must then live
    # in the LoRAs)
    Field("student.guidance_scale", 1.0, _value(validation.positive_number), "the pair's true CFG scale"),
    Field("student.negative_prompt", " ", _student_negative,
          "the student's CFG negative: the sample's empty-prompt encoding"),
    # a model without a guidance input, target "teacher": the pair also trains a guidance embedding in the shape
    # of FLUX.1-dev's, on trajectories guided at the scales of teacher.guidance_range, then samples with one pass
    # a step at a scale of that range (saved in the LoRA files, lora_tree.GUIDANCE_EMBEDDER)
    Field("student.guidance_input", False, _guidance_input, "train a guidance embedding beside the LoRAs"),

    Field("mesh", "", _mesh, "device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor); empty: one device",
          fingerprinted=False, because="the same steps spread over devices (their LoRAs agree to rounding, not bit "
          "for bit): a run may resume on another mesh"),

    Field("checkpoint.every", 20, _value(validation.positive_int), "steps between checkpoints",
          fingerprinted=False, because=_RESUMABLE),
    Field("checkpoint.keep", 3, _value(validation.positive_int), "checkpoints kept", fingerprinted=False,
          because=_RESUMABLE),
)


# ---- the config ----

def default_config(family, phase=None):
    """The trainer's config with every field at its default, at `family`'s official recipe, for `phase` ("slow",
    "fast" or "both"; None: the table's default)."""
    family = families.get(family)
    config = ml_collections.ConfigDict()
    for field in FIELDS:
        *sections, leaf = field.name.split(".")
        node = config
        for section in sections:
            if section not in node:
                node[section] = ml_collections.ConfigDict()
            node = node[section]
        node[leaf] = field.default(family) if callable(field.default) else field.default
    if phase is not None:
        config.phase = phase
    return config


def value(config, name):
    """The value of the dotted field `name`; one GlanceError if the config lacks it."""
    node = config
    for part in name.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise GlanceError(f"config.{name} is missing: start the config from glance_jax.train.default_config")
        node = node[part]
    return node


def check(config):
    """Every value of a training config that can be checked without loading anything, in the table's order."""
    for field in FIELDS:
        if field.check is not None:
            field.check(f"config.{field.name}", value(config, field.name), config)


def fingerprinted(config):
    """{name: value} of the fields that shape a run's result (tuples as lists, as JSON holds them)."""
    fields = {f.name: value(config, f.name) for f in FIELDS if f.fingerprinted}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in fields.items()}
