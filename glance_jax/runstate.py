"""What keeps a resumed training run honest: its fingerprint, checkpoint fallback, and where LoRA files go.

- `fingerprint` records everything that shapes a run's result (the config fields that do, as
  glance_jax.train_config marks them, the sample's content, the identity of the base and encoders);
  `check_fingerprint` refuses to resume a workdir whose run had another one, naming what changed.
- `restore_latest` restores the newest checkpoint that reads back, moving a damaged one aside with a
  warning and falling back to the one before.
- The final LoRA file (`<phase>_lora.safetensors`) is written only from the final state, atomically;
  the LoRAs written at checkpoints carry their step in the name and sit under `checkpoints/`.
"""

import atexit
import functools
import glob
import hashlib
import inspect
import json
import logging
import os
import shutil

from glance_jax import safe_io
from glance_jax.errors import GlanceError

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "run.json"
_SAMPLED_BYTES = 1 << 16


def path_identity(path):
    """A cheap identity of a checkpoint file or folder: every file's relative name and size and the sha256
    of its first and last 64 KiB (a changed config, a re-saved or swapped model change it; reading the
    whole of a 24 GB base to hash it would not be cheap)."""
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if not name.startswith("."))
    digest = hashlib.sha256()
    for name in files:
        size = os.path.getsize(name)
        digest.update(f"{os.path.relpath(name, path)}\0{size}\0".encode())
        with open(name, "rb") as f:
            digest.update(f.read(_SAMPLED_BYTES))
            if size > 2 * _SAMPLED_BYTES:
                f.seek(size - _SAMPLED_BYTES)
                digest.update(f.read())
    return digest.hexdigest()


def sample_identity(sample):
    """sha256 of the sample's image bytes (and its source images', for an edit), caption, training size and any
    precomputed encodings beside it."""
    digest = hashlib.sha256()
    for image in (sample.image_path,) + tuple(sample.sources):
        with open(image, "rb") as f:
            digest.update(f.read())
    digest.update(f"\0{sample.caption}\0{sample.width}x{sample.height}".encode())
    encodings = os.path.splitext(sample.image_path)[0] + ".safetensors"
    if os.path.isfile(encodings):
        with open(encodings, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def fingerprint(config_fields, sample, transformer, vae=None, text_encoders=None):
    """{part: value} of everything that shapes a run's LoRAs; `config_fields`: {dotted name: value} of the config
    fields that do (train_config.fingerprinted)."""
    return {"config": dict(config_fields), "sample": sample_identity(sample), "base": path_identity(transformer),
            "vae": path_identity(vae), "text_encoders": path_identity(text_encoders)}


def _differences(old, new):
    """Lines naming what differs between two fingerprints."""
    lines = []
    old_config, new_config = old.get("config", {}), new["config"]
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key, "(unset)") != new_config.get(key, "(unset)"):
            lines.append(f"config.{key} {old_config.get(key, '(unset)')!r} -> {new_config.get(key, '(unset)')!r}")
    names = {"sample": "the sample (image, caption or encodings)", "base": "the base model",
             "vae": "the VAE", "text_encoders": "the text encoders"}
    lines += [f"{names[k]} changed" for k in names if old.get(k) != new[k]]
    return lines


def check_fingerprint(workdir, new):
    """Refuses to go on in `workdir` if it holds a run with another fingerprint (or checkpoints with none)."""
    path = os.path.join(workdir, FINGERPRINT_FILE)
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(workdir, "checkpoints")):
            raise GlanceError(f"{workdir} holds checkpoints but no {FINGERPRINT_FILE}, so they cannot be checked "
                              "against this run: pass --fresh to start anew there, or use another --workdir")
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise GlanceError(f"{path}: unreadable ({e}); pass --fresh to start anew") from None
    changed = _differences(old, new)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise GlanceError(f"{workdir} holds a run with other settings ({'; '.join(changed[:3])}{more}): pass "
                          "--fresh to start anew there, or use another --workdir")


def write_fingerprint(workdir, value):
    """Writes the fingerprint once (atomically); a later run with the same one leaves it as it is."""
    path = os.path.join(workdir, FINGERPRINT_FILE)
    if os.path.exists(path):
        return
    safe_io.write_json(path, value, indent=1, sort_keys=True, default=str)


RUN_FILES = (FINGERPRINT_FILE, "metrics.jsonl", "schedule.json", "slow_lora.safetensors", "fast_lora.safetensors")


def clear_run(workdir):
    """What `--fresh` removes: the files the trainer writes (`RUN_FILES`) and its checkpoints/ folder; a
    file of the user's beside them, even one named like a LoRA, stays."""
    if not os.path.isdir(workdir):
        return
    for name in RUN_FILES:
        if os.path.lexists(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.islink(checkpoints):
        os.remove(checkpoints)  # the link only, never what it points to
    shutil.rmtree(checkpoints, ignore_errors=True)


_LOCKS = {}  # workdir -> the WorkdirLock this process holds


def lock_workdir(workdir):
    """Takes `workdir`'s lock for this process (one run per workdir; see `safe_io.WorkdirLock`), before
    anything is written there; released by `release_workdir`, or when the process ends."""
    workdir = _key(workdir)
    if workdir not in _LOCKS:
        if not _LOCKS:
            atexit.register(lambda: [release_workdir(w) for w in list(_LOCKS)])
        _LOCKS[workdir] = safe_io.WorkdirLock(workdir).acquire()
    return _LOCKS[workdir]


def release_workdir(workdir):
    lock = _LOCKS.pop(_key(workdir), None)
    if lock is not None:
        lock.release()


def _key(workdir):
    return os.path.abspath(os.path.expanduser(os.fspath(workdir)))


def unlock_on_error(start):
    """Decorates a function (or method) that starts a run in its `workdir` argument: if it fails after taking
    the workdir's lock, the lock goes back at once (a caller that keeps the error, a notebook, would otherwise
    hold it)."""
    signature = inspect.signature(start)

    @functools.wraps(start)
    def wrapper(*args, **kwargs):
        workdir = signature.bind(*args, **kwargs).arguments["workdir"]
        held_before = _key(workdir) in _LOCKS
        try:
            return start(*args, **kwargs)
        except BaseException:
            if not held_before:
                release_workdir(workdir)
            raise
    return wrapper


def latest_step_on_disk(workdir, phase):
    """The newest checkpoint step of a phase by its folder name (0 if none): a look before anything loads."""
    directory = os.path.join(workdir, "checkpoints", phase)
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return max(steps, default=0)


def check_resume_step(start, steps, directory):
    """A run resumed from step `start` must not have gone past `steps`: its LoRA would not be that run's."""
    if start > steps:
        raise GlanceError(f"{directory} has a checkpoint at step {start}, beyond config.steps={steps}: pass --fresh "
                          "to start anew there, or use another --workdir")


# ---- LoRA files ----

def final_lora_path(workdir, phase):
    return os.path.join(workdir, f"{phase}_lora.safetensors")


def intermediate_lora_path(workdir, phase, step):
    """Where the LoRA of a checkpoint goes: its step in the name, never at the final path."""
    return os.path.join(workdir, "checkpoints", f"{phase}_lora_step{step}.safetensors")


def prune_intermediate(workdir, phase, keep):
    """Keeps the `keep` newest checkpoint LoRAs of a phase, like the orbax checkpoints they belong to."""
    pattern = os.path.join(workdir, "checkpoints", f"{phase}_lora_step*.safetensors")
    step = lambda p: int(os.path.basename(p)[len(f"{phase}_lora_step"):-len(".safetensors")])
    for old in sorted(glob.glob(pattern), key=step)[:-keep]:
        os.remove(old)


# ---- checkpoints ----

def _sync_processes(name):
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def restore_latest(open_manager, restore, is_writer=True):
    """(manager, step, state) from the newest checkpoint that restores; (manager, 0, None) if there is none.

    A checkpoint that fails to restore (a damaged file, a half-deleted folder) is moved aside to
    `<phase>.corrupt-step<N>` with a warning, and the one before is tried.
    """
    manager = open_manager()
    while manager.latest_step() is not None:
        step = manager.latest_step()
        try:
            return manager, step, restore(manager, step)
        except GlanceError:
            raise
        except Exception as e:  # orbax raises many types for a damaged checkpoint
            directory = os.fspath(manager.directory)
            aside = f"{directory}.corrupt-step{step}"
            log.warning("checkpoint step %d in %s cannot be restored (%s: %s); moved it to %s and falling back to "
                        "the one before", step, directory, type(e).__name__, str(e).splitlines()[0][:200], aside)
            manager.close()
            if is_writer:
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(os.path.join(directory, str(step)), aside)
            _sync_processes(f"moved aside {aside}")
            manager = open_manager()
    return manager, 0, None
