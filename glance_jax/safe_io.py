"""Writes that land where the user said or nowhere, and the lock that keeps one run per workdir.

- `atomic_file(path)`: every output file (images, JSON, metrics rewrites, safetensors) is written to a
  temporary file in the destination folder and renamed over the destination. A rename replaces a
  symbolic link itself, never its target; a failed write (a full disk, a folder made read-only) ends
  in one `GlanceError`, removes the temporary file and leaves the previous file as it was.
- `append_file(path)`: the one file appended to while a run goes on (the trainer's metrics.jsonl) is
  opened with O_NOFOLLOW, so a symbolic link at its name is refused instead of followed; rewriting it
  whole at every step would cost a copy of the file per step.
- `WorkdirLock`: a lock file holding the PID and host of the run that uses a workdir; a second run is
  refused in one line, a lock left by a dead process on this host is taken over with a warning.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import threading

from glance_jax.errors import GlanceError

log = logging.getLogger(__name__)
LOCK_FILE = "train.lock"


def write_error(path, e):
    """The one line for an OSError `e` while writing `path` (the destination, never the temporary name)."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (free some space and run again)"
    return GlanceError(f"cannot write {path}: {reason}; nothing was written there")


def _temporary(path):
    """(fd, name) of a new temporary file beside `path`, created exclusively, with the usual permissions."""
    folder, base = os.path.split(path)
    for attempt in range(100):
        name = os.path.join(folder, f".{base}.partial-{os.getpid()}-{threading.get_ident()}-{attempt}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666), name
        except FileExistsError:
            continue
    raise GlanceError(f"cannot write {path}: 100 temporary files beside it already exist")


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Yields a file object (mode "wb" or "w", UTF-8) whose content becomes `path` only if the block succeeds.

    A symbolic link at `path` is replaced by the new file (the link's target is not touched); whether a
    link may be replaced at all is the caller's rule (`validation.output_file`).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        fd, tmp = _temporary(path)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json(path, value, **kwargs):
    """`json.dump(value)` into `path`, atomically."""
    with atomic_file(path, "w") as f:
        json.dump(value, f, **kwargs)


def read_json(path):
    """A JSON object from `path` (config.json, model_index.json, an index): anything else is one GlanceError."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise GlanceError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise GlanceError(f"{path}: not a JSON object (it holds a {type(value).__name__})")
    return value


def save_image(image, path, format):
    """A PIL image saved to `path` in `format` ("PNG", "JPEG", "WEBP"), atomically (PIL writes into the open
    temporary file, so it cannot tell the format from the name)."""
    with atomic_file(path) as f:
        image.save(f, format=format)


def own_file(path):
    """Refuses a symbolic link at the name of a file a run appends to (and rewrites): it is never followed."""
    if os.path.islink(path):
        raise GlanceError(f"{path} is a symbolic link; a run appends only to a file of its own (remove the link)")
    return path


def append_file(path):
    """`path` opened for appending text, refusing a symbolic link at its name (O_NOFOLLOW) in one line."""
    path = own_file(os.fspath(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link put there since the look above
            own_file(path)
        raise write_error(path, e) from None
    return os.fdopen(fd, "a", encoding="utf-8")


# ---- one run per workdir ----

def process_alive(pid):
    """Whether a process `pid` runs on this host (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """The lock file `train.lock` of a workdir: {"pid", "host"} of the run that holds it.

    `acquire()` creates it exclusively. A lock held by a live process (or by another host, whose
    processes cannot be checked from here) is refused in one line; one left by a dead process of this
    host is taken over with a warning; one of this very process is simply kept (runs in one process
    follow each other). `release()` removes it, and the workdir too if the lock had created it and it
    is still empty.
    """

    def __init__(self, workdir):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held, self.created = False, False

    def _holder(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # half written by its creator, or damaged: treated as held by an unknown process

    def _try_create(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise write_error(self.path, e) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.me, f)
        return True

    def acquire(self):
        if not os.path.isdir(self.workdir):
            try:
                os.makedirs(self.workdir)
                self.created = True
            except FileExistsError:
                pass
            except OSError as e:
                raise write_error(self.workdir, e) from None
        for _ in range(3):
            if self._try_create():
                self.held = True
                return self
            holder = self._holder()
            pid, host = holder.get("pid"), holder.get("host")
            if host == self.me["host"] and pid == self.me["pid"]:
                self.held = True
                return self
            if host == self.me["host"] and isinstance(pid, int) and not process_alive(pid):
                log.warning("%s was left by process %d, which is gone; taking the workdir over", self.path, pid)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            who = f"process {pid} on {host}" if pid is not None else "another process"
            raise GlanceError(f"{self.workdir} is in use by {who} (its {LOCK_FILE}): wait for that run to end, "
                              f"or use another --workdir; if that run is gone, remove {self.path}")
        raise GlanceError(f"{self.path}: could not take the lock (other runs keep taking it)")

    def release(self):
        if not self.held:
            return
        self.held = False
        if self._holder() == self.me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)  # only if the run wrote nothing there

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---- files that must not run code ----

REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def no_remote_code(folder):
    """Refuses a tokenizer or model folder whose configs ask transformers to import Python code from the
    folder (an `auto_map` entry): glance_jax loads with trust_remote_code=False and says so in one line,
    where transformers would prompt on the terminal or fail with a traceback. A pipeline folder's parts
    (its sub-folders) are checked too, so the refusal comes before any encoder loads."""
    folders = [folder] + sorted(os.path.join(folder, n) for n in os.listdir(folder)
                                if os.path.isdir(os.path.join(folder, n)) and not n.startswith("."))
    for path in (os.path.join(f, name) for f in folders for name in REMOTE_CODE_FILES):
        if not os.path.isfile(path):
            continue
        config = read_json(path)
        if "auto_map" in config:
            raise GlanceError(f"{path} asks to run Python code from its folder (auto_map: "
                              f"{json.dumps(config['auto_map'])[:120]}); glance_jax never runs code from a model "
                              "folder (trust_remote_code=False): use a folder with a built-in tokenizer class")
