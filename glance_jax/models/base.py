"""What every ported transformer shares: construction from a diffusers config, loading, random init."""

import dataclasses

import jax.numpy as jnp


class PretrainedModel:
    """Mixin for Flax transformers whose fields are diffusers' config keys.

    Subclasses set `config_keys` (the diffusers config.json keys they read)
    and implement `example_inputs()`.
    """

    config_keys = ()
    unsupported = {}  # config key -> the only supported value

    @classmethod
    def from_config(cls, config, dtype=jnp.float32, **overrides):
        """Builds the module from a diffusers config.json dict (other keys, such as `_class_name`, are ignored)."""
        from glance_jax.errors import GlanceError

        for key, supported in cls.unsupported.items():
            if config.get(key, supported) != supported:
                raise GlanceError(f"config.json: {key}={config[key]!r} is not supported ({cls.__name__})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in cls.config_keys and k in fields}
        if "axes_dims_rope" in kwargs:
            kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
        return cls(**kwargs, dtype=dtype, param_dtype=dtype, **overrides)

    def to_config(self):
        """The diffusers config.json dict of this model."""
        config = {k: getattr(self, k) for k in self.config_keys}
        config["axes_dims_rope"] = list(config["axes_dims_rope"])
        return {"_class_name": type(self).__name__, **config}

    def init_params(self, rng):
        """Random parameters (for tests and new models; real weights come from `from_pretrained`)."""
        return self.init(rng, **self.example_inputs())["params"]

    @classmethod
    def from_pretrained(cls, path, dtype=jnp.float32, **overrides):
        """`(model, params)` from a diffusers `transformer/` folder, a converted folder (or, for FLUX, a BFL file).

        `quantize="fp8"` or `"int8"` loads an 8-bit frozen base (see glance_jax.quantize).
        """
        from glance_jax import checkpoints
        return checkpoints.load_model(path, dtype=dtype, expected_class=cls, **overrides)
