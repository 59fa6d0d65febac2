"""What every ported transformer shares: construction from a diffusers config, loading, random init."""

import dataclasses
import math

import jax.numpy as jnp

from glance_jax import checkpoints
from glance_jax.errors import GlanceError


class PretrainedModel:
    """Mixin for Flax transformers whose fields are diffusers' config keys.

    Subclasses set `config_keys` (the diffusers config.json keys they read)
    and implement `example_inputs()`.
    """

    config_keys = ()
    unsupported = {}  # config key -> the only supported value
    required_config_keys = ()  # size fields a config.json must hold: a missing one must not become a default

    @classmethod
    def check_config(cls, config):
        """Raises one GlanceError naming a missing size field or a field of the wrong type or range."""
        where = f"config.json ({cls.__name__})"
        if not isinstance(config, dict):
            raise GlanceError(f"{where}: not a JSON object")
        missing = [k for k in cls.required_config_keys if k not in config]
        if missing:
            raise GlanceError(f"{where} lacks {', '.join(missing)}: the model's size cannot be guessed")
        for field in dataclasses.fields(cls):
            if field.name in cls.config_keys and field.name in config:
                kind = field.type.__name__ if isinstance(field.type, type) else str(field.type)
                problem = _type_problem(kind, config[field.name])
                if problem:
                    raise GlanceError(f"{where}: {field.name}={config[field.name]!r} {problem}")
        dims, head = config.get("axes_dims_rope"), config.get("attention_head_dim")
        if "axes_dims_rope" in cls.config_keys and dims is not None and head is not None and sum(dims) != head:
            raise GlanceError(f"{where}: axes_dims_rope {dims} add up to {sum(dims)}, not attention_head_dim={head}")

    @classmethod
    def from_config(cls, config, dtype=jnp.float32, **overrides):
        """Builds the module from a diffusers config.json dict (other keys, such as `_class_name`, are ignored)."""
        cls.check_config(config)
        for key, supported in cls.unsupported.items():
            if config.get(key, supported) != supported:
                raise GlanceError(f"config.json: {key}={config[key]!r} is not supported ({cls.__name__})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                  if k in cls.config_keys and k in fields}  # lists as tuples: a module's fields are hashable
        return cls(**kwargs, dtype=dtype, param_dtype=dtype, **overrides)

    def to_config(self):
        """The diffusers config.json dict of this model (tuples written as JSON lists)."""
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in
                                                                          self.config_keys)}
        return {"_class_name": type(self).__name__, **config}

    def init_params(self, rng):
        """Random parameters (for tests and new models; real weights come from `from_pretrained`)."""
        return self.init(rng, **self.example_inputs())["params"]

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, **overrides):
        """`(model, params)` from a diffusers `transformer/` folder, a converted folder (or, for FLUX, a BFL file).

        `quantize="fp8"` or `"int8"` loads an 8-bit frozen base (see glance_jax.quantize).
        """
        return checkpoints.load_model(path, dtype=dtype, expected_class=cls, **overrides)


def _type_problem(annotation, value):
    """Why `value` does not fit a field annotated `annotation` (int: > 0, float: finite), or None."""
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
    number = lambda v: integer(v) or isinstance(v, float) and math.isfinite(v)
    if value is None:
        return None if "None" in annotation else "must be set"
    if annotation.startswith(("Sequence", "typing.Sequence", "tuple")):
        item = annotation.split("[", 1)[-1]
        if not isinstance(value, (list, tuple)) or not value:
            return "must be a non-empty list"
        value, single = list(value), False
    else:
        item, value, single = annotation, [value], True
    for v in value:
        if item.startswith("bool") and not isinstance(v, bool):
            return "must be true or false" if single else "must hold true or false only"
        if item.startswith("int") and not (integer(v) and v > 0):
            return "must be a positive integer" if single else "must hold positive integers only"
        if item.startswith("float") and not number(v):
            return "must be a finite number" if single else "must hold finite numbers only"
        if item.startswith("str") and not isinstance(v, str):
            return "must be a string"
    return None
