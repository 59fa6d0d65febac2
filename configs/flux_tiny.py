"""A tiny FLUX run for tests and smoke checks: both phases, 12 steps each, on a 256-pixel sample.

    glance-jax train --config configs/flux_tiny.py --workdir /tmp/glance_tiny \
        --config.model.path=/path/to/tiny/transformer --config.data.dir=/path/to/one_sample

Expected run time: under a minute on 2 CPU cores (mostly compilation).
"""

from glance_jax.recipes import official


def get_config():
    c = official("flux", "both")
    c.steps = 12
    c.model.dtype = "fp32"
    c.data.resolution = 256
    c.lora.rank, c.lora.alpha = 4, 16.0
    c.optim.warmup_steps = 2
    c.checkpoint.every = 4
    c.checkpoint.keep = 2
    c.data.cache_dir = ""
    return c
