"""The registry of model families: every family glance_jax runs, and the questions asked of all of them.

Each family is a folder (glance_jax/flux, glance_jax/qwen_image) whose
`adapter.py` fills in one `glance_jax.family.Family` record; adding a family
adds its folder and one entry to `FAMILIES` below. The rest of glance_jax
asks the records (`get(name)`, `of(model)`) instead of testing class names,
parameter keys or channel counts, and checks the parts of a pipeline folder
here by the classes their configs name, before anything is loaded.
"""

import os

from glance_jax import checkpoints, safe_io
from glance_jax.errors import GlanceError
from glance_jax.family import Family
from glance_jax.flux.adapter import FLUX
from glance_jax.flux_kontext.adapter import FLUX_KONTEXT
from glance_jax.modules.identity_vae import IdentityVAE
from glance_jax.qwen_image.adapter import QWEN_IMAGE
from glance_jax.qwen_image_edit.adapter import QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS

# a new family: its adapter here (one that shares another's transformer: after it)
FAMILIES = (FLUX, FLUX_KONTEXT, QWEN_IMAGE, QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS)
NAMES = tuple(f.name for f in FAMILIES)
VARIANTS = tuple(v for f in FAMILIES for v in f.variants)  # the planner's model names
# every model class a checkpoint may hold (the identity VAE: a pixel-space model's "VAE" folder)
CLASSES = checkpoints.class_table([cls for f in FAMILIES for cls in f.models] + [IdentityVAE])


def load_model(path, dtype="fp32", **kwargs):
    """`(model, params)` of whatever model the checkpoint at `path` holds (see `checkpoints.load_model`)."""
    return checkpoints.load_model(path, dtype, classes=CLASSES, **kwargs)


def get(name):
    """The family called `name` ("flux" or "qwen-image"); a Family passes through."""
    if isinstance(name, Family):
        return name
    for family in FAMILIES:
        if family.name == name:
            return family
    raise GlanceError(f"unknown model family {name!r}: use one of {', '.join(NAMES)}")


def of(model):
    """The family of a model (transformer, VAE, text encoder) instance or class."""
    cls = model if isinstance(model, type) else type(model)
    for family in FAMILIES:
        if issubclass(cls, family.models):
            return family
    raise GlanceError(f"a {cls.__name__} belongs to no model family ({', '.join(NAMES)})")


def of_class_name(name):
    """The family whose transformer a checkpoint's config names (`_class_name`)."""
    for family in FAMILIES:
        if family.transformer.__name__ == name:
            return family
    raise GlanceError(f"{name!r} is the transformer of no model family ({', '.join(NAMES)})")


def of_pipeline(path, transformer_family=None):
    """The family of a diffusers pipeline folder, by the pipeline class its model_index.json names (an editing
    model shares its transformer class with a text-to-image one); `transformer_family` if it names none known."""
    index = os.path.join(os.path.expanduser(os.fspath(path)), checkpoints.PIPELINE_FILE)
    name = safe_io.read_json(index).get("_class_name") if os.path.isfile(index) else None
    for family in FAMILIES:
        if name in family.pipelines:
            return family
    return transformer_family


def of_variant(name):
    """(family, transformer overrides) of a planner model name: "flux-dev", "flux-schnell", "qwen-image"."""
    for family in FAMILIES:
        if name in family.variants:
            return family, family.variants[name]
    raise GlanceError(f"unknown model {name!r}: use one of {', '.join(VARIANTS)}")


def lora_preset(name):
    """The target patterns of a LoRA preset: a family's name (the official targets) or "<name>-all"."""
    for family in FAMILIES:
        if name == family.name:
            return family.lora_targets
        if name == family.name + "-all":
            return family.lora_targets_all
    presets = [p for f in FAMILIES for p in (f.name, f.name + "-all")]
    raise GlanceError(f"unknown LoRA preset {name!r}; presets: {', '.join(presets)}")


def is_preset(name):
    return isinstance(name, str) and name in [p for f in FAMILIES for p in (f.name, f.name + "-all")]


# ---- the parts of a pipeline folder, checked by the classes their configs name, before anything is loaded ----

def _component(path, component, wanted, what):
    """`path`, or its `component` folder if it is a pipeline folder, after checking it holds one of `wanted`."""
    path = checkpoints.hub.resolve(path, what, (component,))
    parts = checkpoints.pipeline_parts(path)
    if parts is not None:
        if component not in parts:
            raise GlanceError(f"{what} {path}: a pipeline folder without {component}/")
        path = parts[component]
    else:
        path = os.path.expanduser(os.fspath(path))
    held = checkpoints.peek_class(path, CLASSES)
    if held not in wanted:
        raise GlanceError(f"{what} {path} holds {held}, not {' or '.join(wanted)}")
    return path


def transformer_path(path, family=None, what="the model path"):
    """The transformer checkpoint a user's path stands for (a pipeline folder gives its transformer/),
    refused in one line if it holds another kind of model (or another family than `family`)."""
    wanted = tuple(dict.fromkeys(f.transformer.__name__ for f in ([get(family)] if family else FAMILIES)))
    return _component(path, "transformer", wanted, what)


def vae_path(path, what="the VAE path"):
    """The VAE folder a user's path stands for (a pipeline folder gives its vae/), checked by its config."""
    return _component(path, "vae", tuple(dict.fromkeys(f.vae.__name__ for f in FAMILIES)), what)


def text_encoders_path(path, family, what="the text encoder path"):
    """The pipeline folder holding `family`'s text encoder(s) and tokenizer(s), checked by their configs."""
    family = get(family)
    path = checkpoints.hub.resolve(path, what, text_encoder_parts(family))
    for folder, wanted in family.text_encoders.items():
        sub = os.path.join(path, folder)
        if not os.path.isdir(sub):
            raise GlanceError(f"{what} {path}: no {folder}/ in it (give the pipeline folder that holds "
                              f"{', '.join(family.text_encoders)} and their tokenizers)")
        held = checkpoints.peek_class(sub, CLASSES)
        if held not in wanted:
            raise GlanceError(f"{what} {sub} holds {held}, not {wanted[0]}")
    return path


def text_encoder_parts(family=None):
    """The pipeline sub-folders of `family`'s (or every family's) text encoders and their tokenizers."""
    folders = [f for fam in ([get(family)] if family else FAMILIES) for f in fam.text_encoders]
    return tuple(dict.fromkeys(folders + [f.replace("text_encoder", "tokenizer") for f in folders]))


def local_model_path(path, what="the model path", family=None, vae=None, text_encoders=None):
    """A user's model path on disk: a hub id fetches its transformer, scheduler and the parts not given."""
    needed = ["transformer", "scheduler"] + ([] if vae else ["vae"]) + ([] if text_encoders else
                                                                     list(text_encoder_parts(family)))
    return checkpoints.hub.resolve(path, what, needed)


def model_paths(path, family=None, vae=None, text_encoders=None, what="the model path"):
    """(transformer, vae or None, text encoders or None) for a user's model path: a pipeline folder supplies
    all three; explicitly given `vae` / `text_encoders` paths override its parts. Every path is checked
    for the kind of model it holds before anything is loaded."""
    path = local_model_path(path, what, family, vae, text_encoders)
    parts = checkpoints.pipeline_parts(path) or {}
    transformer = transformer_path(path, family, what)
    if family is None:
        family = of_class_name(checkpoints.peek_class(transformer, CLASSES))
    if vae:
        vae = vae_path(vae)
    elif "vae" in parts:
        vae = vae_path(parts["vae"])
    if text_encoders:
        text_encoders = text_encoders_path(text_encoders, family)
    elif "text_encoder" in parts:
        text_encoders = text_encoders_path(os.path.dirname(parts["text_encoder"]), family)
    return transformer, vae or None, text_encoders or None
