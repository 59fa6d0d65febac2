"""glance_jax: Glance (Slow-LoRA / Fast-LoRA few-step sampling) for FLUX.1 and Qwen-Image in JAX."""

import importlib.util
import os

__version__ = "0.1.0"


def _quiet_libtpu_without_tpus():
    """With libtpu installed (the `tpu-plan` extra) on a machine without TPUs, JAX still starts libtpu when it
    looks for backends, and libtpu prints five lines of warnings about missing TPU-VM metadata on stderr
    (which would bury this package's one-line errors). Tell it the host, as a TPU VM would; TPU VMs untouched."""
    try:
        if importlib.util.find_spec("libtpu") is None:
            return
    except ImportError:
        return
    try:  # a private JAX helper: if it moves, keep the warnings rather than fail the import
        from jax._src import hardware_utils
        no_tpu = hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0
    except Exception:  # noqa: BLE001
        return
    if no_tpu:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")


_quiet_libtpu_without_tpus()
