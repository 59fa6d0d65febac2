"""Checks that every command runs on its arguments before any expensive work (model load, compile).

Each check raises one `GlanceError` naming the bad value and what would be
accepted, so the command line ends in a single line. They only look at
numbers, names and the file system (a probe file at most): milliseconds.
"""

import argparse
import math
import os
import tempfile

import jax.numpy as jnp
import numpy as np

from glance_jax import safe_io
from glance_jax.errors import GlanceError, UsageError
from glance_jax.schedules import FlowMatchEulerScheduler

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # extension -> PIL format


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals (unknown flag, bad choice, missing argument) are one line, not usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---- numbers and names ----

def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name, value):
    """An integer > 0 (steps, rank, batch sizes)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GlanceError(f"{name} {value!r}: must be a positive integer")
    return value


def non_negative_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GlanceError(f"{name} {value!r}: must be an integer >= 0")
    return value


def positive_number(name, value):
    """A finite number > 0 (learning rates, alpha, clipping, scales of time)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise GlanceError(f"{name} {value!r}: must be a finite number > 0")
    return value


def finite_number(name, value):
    if not _is_number(value) or not math.isfinite(value):
        raise GlanceError(f"{name} {value!r}: must be a finite number")
    return value


def fraction(name, value, closed_top=False):
    """A number in [0, 1) (or [0, 1] with `closed_top`): probabilities, Adam's betas."""
    top_ok = closed_top and value == 1
    if not _is_number(value) or not math.isfinite(value) or value < 0 or (value >= 1 and not top_ok):
        raise GlanceError(f"{name} {value!r}: must be in [0, 1{']' if closed_top else ')'}")
    return value


def seed(name, value):
    """A PRNG seed: an integer in [0, 2**32) (what jax.random.PRNGKey takes without wrapping around)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 32:
        raise GlanceError(f"{name} {value!r}: must be an integer in [0, 4294967295]")
    return value


MAX_PIXELS = 4096 * 4096  # the default cap of sample / eval sizes (--max_pixels): 16 times FLUX.1's 1024 x 1024


def image_size(height, width, max_pixels=MAX_PIXELS):
    """Refuses, before anything loads, a size whose pixel count exceeds `max_pixels` (its latents, schedule
    and attention would not fit any device's memory or time)."""
    if height * width > max_pixels:
        raise GlanceError(f"--height {height} x --width {width} = {height * width} pixels: more than "
                          f"--max_pixels {max_pixels}; pass a larger --max_pixels if the device really holds it")


def scheduler_file(path):
    """A scheduler_config.json, read and checked (types, ranges, no division by zero) before any model loads."""
    config = safe_io.read_json(path)  # a JSON object, or one GlanceError
    try:
        FlowMatchEulerScheduler.from_config(config)
    except GlanceError as e:
        raise GlanceError(f"{path}: {e}") from None
    return config


def one_of(name, value, choices):
    if value not in choices:
        raise GlanceError(f"{name} {value!r}: use one of {', '.join(map(str, choices))}")
    return value


def multiple_of(name, value, multiple, unit="pixels"):
    """A positive size that is a multiple of `multiple` (the model's patch and VAE factors)."""
    positive_int(name, value)
    if value % multiple:
        down, up = value - value % multiple, value - value % multiple + multiple
        raise GlanceError(f"{name} {value}: must be a multiple of {multiple} {unit} (e.g. "
                          f"{down if down else up} or {up})")
    return value


# ---- where output goes ----

def _writable_folder(folder, what):
    """Raises unless `folder` is an existing folder in which a file can be created (tried with a probe)."""
    if not os.path.exists(folder):
        raise GlanceError(f"{what}: the folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise GlanceError(f"{what}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".glance_probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise GlanceError(f"{what}: cannot write in {folder} ({e.strerror})") from None


def _link_rule(path, overwrite, what):
    """A symbolic link at an output's name (dangling or not) is refused unless `overwrite`; with it the
    writers (`safe_io.atomic_file`) replace the link itself, never the file it points to."""
    if os.path.islink(path) and not overwrite:
        raise GlanceError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); outputs are not written "
                          "through links: pass --overwrite to replace the link itself, or choose another name")


def output_file(path, overwrite=False, what="output"):
    """A file about to be written: its folder exists and is writable; it is no folder; an existing file
    (or a symbolic link, even a dangling one) is replaced only with `overwrite` (the same rule in every
    command)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    _link_rule(path, overwrite, what)
    if os.path.isdir(path) and not os.path.islink(path):
        raise GlanceError(f"{what} {path} is a folder; give a file name")
    if os.path.exists(path) and not overwrite:
        raise GlanceError(f"{what} {path} already exists (pass --overwrite to replace it)")
    _writable_folder(os.path.dirname(path), what)
    return path


def new_folder(path, overwrite=False, what="output"):
    """A folder a command creates whole (convert's DST): refused if it exists, unless `overwrite`; its
    parent must be a writable folder."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    _link_rule(path, overwrite, what)
    if os.path.exists(path) and not overwrite:
        raise GlanceError(f"{what} {path} already exists (pass --overwrite to replace it)")
    if os.path.isfile(path) and not os.path.islink(path):
        raise GlanceError(f"{what} {path} is a file; the output is a folder")
    _writable_folder(os.path.dirname(path), what)
    return path


def output_folder(path, what="--workdir"):
    """A folder that will be created if missing (with its parents): it must not be a file, and the
    nearest existing folder on its path must be writable."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise GlanceError(f"{what} {path} is a file, not a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _writable_folder(existing, what)
    return path


def fresh_outputs(folder, names, overwrite, what="--workdir"):
    """Refuses to replace the files `names` of `folder` that exist, unless `overwrite`."""
    for name in names:
        _link_rule(os.path.join(folder, name), overwrite, what)
    present = [n for n in names if os.path.lexists(os.path.join(folder, n))]
    if present and not overwrite:
        raise GlanceError(f"{what} {folder} already holds {', '.join(present)} (pass --overwrite to replace "
                          "them, or choose another folder)")


def out_extension(path, allowed):
    """The lower-case extension of `path`, refused unless it is one of `allowed` (what is really written)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in allowed:
        raise GlanceError(f"--out {path}: the extension {ext or '(none)'!r} does not match anything written here; "
                          f"use {', '.join(allowed)}")
    return ext


# ---- text files ----

def read_text(path, what="text file"):
    """The text of a caption or prompt file: UTF-8 (a byte-order mark is dropped); any other encoding is
    refused in one line that names it where it can be told (UTF-16 / UTF-32 by their marks)."""
    with open(path, "rb") as f:
        raw = f.read()
    for mark, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                       (b"\xfe\xff", "UTF-16")):
        if raw.startswith(mark):
            raise GlanceError(f"{path}: the {what} is {name}-encoded; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        guess = "probably Latin-1 / Windows-1252" if b"\x00" not in raw else "probably UTF-16 without a mark"
        raise GlanceError(f"{path}: the {what} is not UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start}; "
                          f"{guess}); save it as UTF-8") from None


# ---- a LoRA file's metadata: data, never code ----

MAX_PATTERN = 1000  # characters of one rank/alpha pattern key
_PATTERN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def lora_config(config, where):
    """A LoraConfig dict from a file's metadata or adapter_config.json, every field glance_jax reads checked:
    r and lora_alpha numbers, rank_pattern / alpha_pattern objects of module names to numbers.

    Pattern keys must be module names (`transformer_blocks.0.attn.to_q`, or a suffix such as `to_q`):
    PEFT reads them as regular expressions, which a file could make backtrack for hours, so a key with
    any other character is refused in one line instead of being run.
    """
    if not isinstance(config, dict):
        raise GlanceError(f"{where}: its LoRA config is not a JSON object")
    for key in ("r", "lora_alpha"):
        if key in config and config[key] is not None and (not _is_number(config[key])
                                                          or not math.isfinite(config[key])):
            raise GlanceError(f"{where}: its LoRA config's {key} {config[key]!r} is not a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise GlanceError(f"{where}: its LoRA config's {key} is not an object of module names to numbers")
        for pattern, value in patterns.items():
            if len(pattern) > MAX_PATTERN or not pattern or not set(pattern) <= _PATTERN_CHARS:
                raise GlanceError(f"{where}: its LoRA config's {key} key {pattern[:80]!r} is not a module name; "
                                  "glance_jax matches module names (exact, or a suffix after a dot), never "
                                  "regular expressions from a file")
            if not _is_number(value) or not math.isfinite(value):
                raise GlanceError(f"{where}: its LoRA config's {key}[{pattern!r}] {value!r} is not a finite number")
    return config


def pattern_value(config, key, name, default):
    """A per-module value of a checked LoRA config: the `key` (rank_pattern / alpha_pattern) entry whose
    module name is `name` or a suffix of it after a dot (PEFT's rule on plain names), else `default`."""
    for pattern, value in (config.get(key) or {}).items():
        if name == pattern or name.endswith("." + pattern):
            return value
    return default


def pipeline_inputs(batch, arrays, numbers):
    """The Python pipelines' inputs: each array of `arrays` ({name: array or None}) has `batch` rows and
    finite values (checked on its device), each of `numbers` ({name: value}) is a finite number."""
    for name, value in numbers.items():
        finite_number(name, value)
    for name, value in arrays.items():
        if value is None:
            continue
        if getattr(value, "ndim", 0) < 1 or value.shape[0] != batch:
            raise GlanceError(f"{name} has shape {tuple(getattr(value, 'shape', ()))}: {batch} rows needed, one "
                              "per prompt (nothing is broadcast)")
        if jnp.issubdtype(value.dtype, jnp.floating) and getattr(value, "is_fully_addressable", True) and not bool(
                jnp.isfinite(value).all()):
            raise GlanceError(f"{name} holds NaN or infinite values; refused before sampling")


def finite_arrays(arrays, where):
    """Refuses arrays ({name: array}) holding NaN or inf, naming the first such one."""
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise GlanceError(f"{where}: {name} holds {bad} NaN or infinite value(s); refused before any use")
