"""Hostile files and faults: every file is built here, by the test that feeds it to glance_jax.

No code runs from a model folder (tokenizer `auto_map`, pickles); no write lands outside its destination
(symbolic links, a full disk); LoRA metadata is data (no regular expressions), headers, indexes and
configs are type-checked; NaN and merges that cannot be undone are refused; images are read as a viewer
shows them; captions and prompt files are UTF-8 or refused; one run per workdir. Models: the demo's
committed teacher (a tiny FLUX.1 transformer), no training.
"""

import errno
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from glance_jax import (checkpoints, data, families, lora, lora_formats, lora_tree, prompts, runstate, safe_io,
                        schedules, validation)
from glance_jax.checkpoints import safetensors_io
from glance_jax.cli import main
from glance_jax.demo import teacher
from glance_jax.errors import GlanceError
from glance_jax.flux.adapter import SCHEDULER as FLUX_SCHEDULER
from test_text import word_tokenizer

PROMPT = "the numeral three, written by hand"


class HeavyWork(Exception):
    """Raised by the stand-in for model loading: reaching it means every check passed."""


@pytest.fixture
def no_heavy_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise HeavyWork()
    monkeypatch.setattr(checkpoints, "load_model", refuse)


@pytest.fixture(scope="module")
def base():
    return families.load_model(teacher.TEACHER_DIR)


def one_line(capsys, code, *words):
    """The command failed with exit 1 or 2 and printed one line holding `words`, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2), err
    assert len(err) == 1 and ": error: " in err[0] and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], err
    return err[0]


def sample(out, *extra):
    return ["sample", "--prompt", PROMPT, "--out", str(out), *extra]


def test_the_working_sample_command_gets_to_the_model_load(no_heavy_work, tmp_path):
    with pytest.raises(HeavyWork):
        main(sample(tmp_path / "x.png"))


# ---- writes land where the user said, or nowhere ----

@pytest.mark.parametrize("dangling", [True, False])
def test_an_output_that_is_a_symbolic_link_is_refused(no_heavy_work, tmp_path, capsys, dangling):
    target = tmp_path / "elsewhere" / "victim.png"
    target.parent.mkdir()
    if not dangling:
        target.write_bytes(b"the user's file")
    (tmp_path / "d.png").symlink_to(target)
    one_line(capsys, main(sample(tmp_path / "d.png")), "d.png is a symbolic link", "--overwrite")
    assert os.listdir(target.parent) == ([] if dangling else ["victim.png"])
    assert dangling or target.read_bytes() == b"the user's file"


def test_eval_refuses_a_linked_eval_json(no_heavy_work, tmp_path, capsys):
    work, prompts_file = tmp_path / "eval", tmp_path / "prompts.txt"
    work.mkdir()
    prompts_file.write_text(PROMPT + "\n")
    (work / "eval.json").symlink_to(tmp_path / "nowhere.json")
    code = main(["eval", "--prompts", str(prompts_file), "--workdir", str(work), "--base_steps", "4"])
    one_line(capsys, code, "eval.json is a symbolic link")
    assert not (tmp_path / "nowhere.json").exists()


def test_with_overwrite_the_link_itself_is_replaced(tmp_path, capsys):
    """A real sample through a link to the user's file: the link becomes the image, the file is untouched."""
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    link = tmp_path / "three.png"
    link.symlink_to(target)
    assert main(sample(link, "--overwrite")) == 0
    assert not link.is_symlink() and Image.open(link).size == (8, 8)
    assert target.read_text() == "keep me"
    assert [n for n in os.listdir(tmp_path) if ".partial" in n] == []


def test_export_lora_and_convert_refuse_a_linked_destination_and_replace_it_with_overwrite(base, tmp_path, capsys):
    src = _lora_file(base, tmp_path / "lora.safetensors")
    target = tmp_path / "victim.safetensors"
    target.write_bytes(b"the user's file")
    (tmp_path / "k.safetensors").symlink_to(target)
    export = ["export-lora", str(src), str(tmp_path / "k.safetensors"), "--model", teacher.TEACHER_DIR]
    one_line(capsys, main(export), "DST", "k.safetensors is a symbolic link")
    assert main(export + ["--overwrite"]) == 0
    capsys.readouterr()
    assert target.read_bytes() == b"the user's file" and not (tmp_path / "k.safetensors").is_symlink()
    (tmp_path / "flax").symlink_to(tmp_path / "elsewhere")
    one_line(capsys, main(["convert", teacher.TEACHER_DIR, str(tmp_path / "flax")]), "flax is a symbolic link")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EACCES])
def test_a_failed_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, failure):
    out = tmp_path / "metrics.json"
    safe_io.write_json(out, {"good": 1})

    def fail(fd):
        raise OSError(failure, os.strerror(failure))
    monkeypatch.setattr(os, "fsync", fail)  # the data is written, the disk refuses to keep it
    with pytest.raises(GlanceError, match=f"cannot write {out}: {os.strerror(failure)}.*nothing was written"):
        safe_io.write_json(out, {"bad": 2})
    assert json.loads(out.read_text()) == {"good": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_full_disk_during_sample_leaves_no_file(tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    one_line(capsys, main(sample(tmp_path / "three.png")), "No space left on device", "free some space")
    assert os.listdir(tmp_path) == []  # no 0-byte PNG that a rerun would call "exists"


def test_an_os_error_anywhere_in_a_command_is_one_line(tmp_path, monkeypatch, capsys):
    """A folder made read-only (or a disk gone) under a running command: one line, not a traceback."""
    import glance_jax.sampling_cli

    def read_only(args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "x"))
    monkeypatch.setattr(glance_jax.sampling_cli, "_check_common", read_only)
    one_line(capsys, main(sample(tmp_path / "three.png")), f"{os.strerror(errno.EROFS)} ({tmp_path / 'x'})")


def test_appending_refuses_a_link_and_appends_to_a_file(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(GlanceError, match="metrics.jsonl is a symbolic link; a run appends only to a file of its own"):
        safe_io.append_file(tmp_path / "metrics.jsonl")
    assert not (tmp_path / "elsewhere.jsonl").exists()
    for line in ("a\n", "b\n"):
        with safe_io.append_file(tmp_path / "own.jsonl") as f:
            f.write(line)
    assert (tmp_path / "own.jsonl").read_text() == "a\nb\n"


def test_safetensors_files_replace_a_link_never_its_target(tmp_path):
    target = tmp_path / "victim.safetensors"
    safetensors_io.save_file({"x": np.zeros(2, np.float32)}, target)
    before = target.read_bytes()
    (tmp_path / "lora.safetensors").symlink_to(target)
    safetensors_io.save_file({"y": np.ones(3, np.float32)}, tmp_path / "lora.safetensors")
    assert target.read_bytes() == before and not (tmp_path / "lora.safetensors").is_symlink()
    assert list(safetensors_io.SafetensorsFile(tmp_path / "lora.safetensors").keys()) == ["y"]


# ---- one run per workdir ----

def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_workdir_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    work = tmp_path / "run"
    work.mkdir()
    lock = work / safe_io.LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(GlanceError, match=f"is in use by process {holder.pid} on"):
            safe_io.WorkdirLock(work).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock.write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(GlanceError, match="in use by process 1 on another-host"):
        safe_io.WorkdirLock(work).acquire()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    taken = safe_io.WorkdirLock(work).acquire()
    assert "which is gone; taking the workdir over" in caplog.text
    assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    taken.release()
    assert not lock.exists()


def test_a_lock_on_a_new_workdir_leaves_nothing_when_released(tmp_path):
    runstate.lock_workdir(tmp_path / "new")
    assert (tmp_path / "new" / safe_io.LOCK_FILE).exists()
    runstate.release_workdir(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_run_that_fails_to_start_gives_its_lock_back(tmp_path):
    class Failing:
        @runstate.unlock_on_error
        def __init__(self, config, workdir):
            runstate.lock_workdir(workdir)
            raise GlanceError("a check after the lock failed")
    with pytest.raises(GlanceError, match="after the lock failed"):
        Failing(None, tmp_path / "work")
    assert not (tmp_path / "work").exists()  # the lock file, and the folder it made, are gone


def test_fresh_removes_only_the_trainers_files(tmp_path):
    for name in (*runstate.RUN_FILES, "checkpoints/slow/4/x", "my_lora.safetensors", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    runstate.clear_run(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["my_lora.safetensors", "notes.txt"]


# ---- no code from a file ----

def _evil_tokenizer(folder, marker):
    """A working tokenizer folder whose config asks transformers to import a Python file that leaves `marker`."""
    word_tokenizer(folder, ["</s>"], "$A </s>", 16)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")


def test_a_tokenizer_asking_for_remote_code_is_refused(tmp_path):
    _evil_tokenizer(tmp_path / "tok", tmp_path / "marker")
    with pytest.raises(GlanceError, match=r"tokenizer_config.json asks to run Python code .*trust_remote_code=False"):
        prompts.load_tokenizer(str(tmp_path / "tok"))
    assert not (tmp_path / "marker").exists()
    word_tokenizer(tmp_path / "plain", ["</s>"], "$A </s>", 16)  # without auto_map it loads
    assert prompts.load_tokenizer(str(tmp_path / "plain"))("a photo")["input_ids"]


def test_sample_refuses_remote_code_before_loading(no_heavy_work, tmp_path, capsys):
    _evil_tokenizer(tmp_path / "pipe" / "tokenizer_2", tmp_path / "marker")
    code = main(sample(tmp_path / "x.png", "--text_encoders", str(tmp_path / "pipe")))
    one_line(capsys, code, "tokenizer_2/tokenizer_config.json asks to run Python code")
    assert not (tmp_path / "marker").exists() and not (tmp_path / "x.png").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


@pytest.mark.parametrize("name", ["lora.bin", "lora.safetensors"])
def test_a_pickle_lora_is_named_a_pickle_and_never_loaded(base, tmp_path, name):
    import torch
    path = tmp_path / name
    torch.save({"payload": _Payload(str(tmp_path / "marker"))}, path)
    with pytest.raises(GlanceError, match=r"not a safetensors file but a (pickle|zip archive, torch.save's format "
                                          r"with a pickle inside) .*can run any code when it is loaded"):
        lora.load_lora(path, base[1])
    (tmp_path / "protocol4.safetensors").write_bytes(pickle.dumps(_Payload(str(tmp_path / "marker")), protocol=4))
    with pytest.raises(GlanceError, match="not a safetensors file but a pickle"):
        lora.load_lora(tmp_path / "protocol4.safetensors", base[1])
    assert not (tmp_path / "marker").exists()


def test_a_lora_folder_of_pickles_says_so(base, tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(str(tmp_path / "marker")), protocol=2))
    with pytest.raises(GlanceError, match="adapter_model.bin: pickles, which can run any code when loaded, are never"):
        lora.load_lora(tmp_path, base[1])
    assert not (tmp_path / "marker").exists()


def test_a_model_folder_of_pickles_says_so(tmp_path):
    (tmp_path / "config.json").write_text((open(os.path.join(teacher.TEACHER_DIR, "config.json")).read()))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({}, protocol=2))
    with pytest.raises(GlanceError, match="diffusion_pytorch_model.bin are pickles"):
        checkpoints.open_checkpoint(tmp_path, families.CLASSES)


# ---- untrusted metadata is data ----

def _lora_file(base, path, config=None, raw_metadata=None, poison=None):
    """A diffusers-layout LoRA of the teacher, with its LoraConfig metadata replaced by `config` (or text)."""
    tree = lora.init_lora(jax.random.PRNGKey(0), base[1], "flux", 2, 2.0)
    tree = jax.tree_util.tree_map(lambda x: x + 0.01 if x.ndim > 1 else x, tree)
    lora.save_lora(tree, path)
    f = safetensors_io.SafetensorsFile(path)
    tensors = {k: f.read(k) for k in f.keys()}
    if poison is not None:
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = poison
    metadata = dict(f.metadata)
    if config is not None or raw_metadata is not None:  # as another tool writes it: no record of a folded scale
        metadata[lora_formats.METADATA_KEY] = raw_metadata if raw_metadata is not None else json.dumps(config)
        metadata.pop(lora_formats.FOLDED_KEY, None)
    safetensors_io.save_file(tensors, path, metadata)
    return path


@pytest.mark.parametrize("config,raw,message", [
    ({"transformer.r": 2, "transformer.lora_alpha": 2, "transformer.alpha_pattern": {"(a+)+$": 8}}, None,
     "alpha_pattern key '(a+)+$' is not a module name"),
    ({"transformer.r": 2, "transformer.lora_alpha": 2, "transformer.rank_pattern": {"to_q[": 8}}, None,
     "rank_pattern key 'to_q[' is not a module name"),
    ({"transformer.r": 2, "transformer.lora_alpha": "sixteen"}, None, "lora_alpha 'sixteen' is not a finite number"),
    ({"transformer.r": 2, "transformer.lora_alpha": 2, "transformer.alpha_pattern": ["to_q"]}, None,
     "alpha_pattern is not an object"),
    ({"transformer.r": 2, "transformer.lora_alpha": 2, "transformer.alpha_pattern": {"to_q": None}}, None,
     "alpha_pattern['to_q'] None is not a finite number"),
    (None, "{not json", "lora_adapter_metadata metadata: not JSON"),
    (None, "[1, 2]", "its LoRA config is not a JSON object"),
])
def test_lora_metadata_is_type_checked_and_never_a_regex(base, tmp_path, capsys, config, raw, message):
    path = _lora_file(base, tmp_path / "lora.safetensors", config, raw)
    with pytest.raises(GlanceError, match=None) as e:
        lora.load_lora(path, base[1])
    assert message in str(e.value) and "\n" not in str(e.value)
    code = main(["export-lora", str(path), str(tmp_path / "out.safetensors"), "--model", teacher.TEACHER_DIR])
    one_line(capsys, code, message)
    assert not (tmp_path / "out.safetensors").exists()


def test_alpha_patterns_match_module_names_as_peft_does(base, tmp_path):
    """Exact names and suffixes after a dot, as PEFT's get_pattern_key matches plain module names."""
    from peft.utils.other import get_pattern_key
    patterns = {"transformer_blocks.1.attn.to_q": 8.0, "to_k": 4.0, "1.attn.to_v": 6.0, "ttn.to_out.0": 9.0}
    names = lora_formats.dense_layers(base[1])
    for name in names:
        want = patterns.get(get_pattern_key(list(patterns), name), 2.0)
        assert validation.pattern_value({"alpha_pattern": patterns}, "alpha_pattern", name, 2.0) == want, name
    config = {"transformer.r": 2, "transformer.lora_alpha": 2.0,
              "transformer.alpha_pattern": {"transformer_blocks.1.attn.to_q": 8.0, "to_k": 4.0}}
    tree = lora.load_lora(_lora_file(base, tmp_path / "p.safetensors", config), base[1])
    attn = tree["transformer_blocks"]["attn"]
    np.testing.assert_array_equal(attn["to_q"]["alpha"], [2.0, 8.0])
    np.testing.assert_array_equal(attn["to_k"]["alpha"], [4.0, 4.0])


def _raw_safetensors(path, header, data=b"\0" * 16):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header,message", [
    ({"x": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, "has the shape [-1, 4]"),
    ({"x": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 16]}}, "larger than the whole file"),
    ({"x": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 16]}}, "has the shape [2.5]"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": "0-16"}}, "has the data_offsets 0-16"),
    ({"x": [1, 2]}, "has a bad or unsupported entry"),
    ({"__metadata__": {"captions": ["a"]}, "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
     "__metadata__ must map strings to strings"),
])
def test_safetensors_headers_are_type_checked(tmp_path, header, message):
    with pytest.raises(GlanceError, match=None) as e:
        safetensors_io.SafetensorsFile(_raw_safetensors(tmp_path / "x.safetensors", header))
    assert message in str(e.value)


def _teacher_copy(folder):
    shutil.copytree(teacher.TEACHER_DIR, folder)
    return folder


@pytest.mark.parametrize("weight_map,message", [
    ({"x_embedder.weight": "../outside.safetensors"}, "names the file '../outside.safetensors', outside the model"),
    ({"x_embedder.weight": "/etc/passwd"}, "names the file '/etc/passwd', outside the model folder"),
    (["diffusion_pytorch_model.safetensors"], "not a safetensors index"),
    ({"x_embedder.weight": 3}, "not a safetensors index"),
])
def test_an_index_may_only_name_files_in_its_folder(tmp_path, weight_map, message):
    folder = _teacher_copy(tmp_path / "model")
    safetensors_io.save_file({"x": np.zeros(2, np.float32)}, tmp_path / "outside.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(GlanceError, match=None) as e:
        checkpoints.open_checkpoint(folder, families.CLASSES)
    assert message in str(e.value)


@pytest.mark.parametrize("change,message", [
    ({"attention_head_dim": None}, "lacks attention_head_dim: the model's size cannot be guessed"),
    ({"num_layers": None}, "lacks num_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be a positive integer"),
    ({"num_layers": "2"}, "num_layers='2' must be a positive integer"),
    ({"guidance_embeds": "no"}, "guidance_embeds='no' must be true or false"),
    ({"axes_dims_rope": [8, 8, 8]}, "axes_dims_rope [8, 8, 8] add up to 24, not attention_head_dim=32"),
    ("a list", "not a JSON object"),
])
def test_a_model_config_names_the_missing_or_bad_field(tmp_path, change, message):
    folder = _teacher_copy(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    if isinstance(change, dict):
        for key, value in change.items():
            config.pop(key) if value is None else config.__setitem__(key, value)
    else:
        config = [config]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GlanceError, match=None) as e:
        families.load_model(folder)
    assert message in str(e.value)


# ---- finite or refused ----

@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_lora_file_holding_nan_or_inf_is_refused(base, tmp_path, value):
    path = _lora_file(base, tmp_path / "nan.safetensors", poison=value)
    with pytest.raises(GlanceError, match="holds 1 NaN or infinite value"):
        lora.load_lora(path, base[1])


def _bumped(tree, factor):
    return jax.tree_util.tree_map_with_path(lambda p, x: x + factor if p[-1].key == "B" else x, tree)


def test_merge_refuses_nan_and_unround_trippable_scales_and_leaves_the_base(base):
    _, params = base
    keep = jax.tree_util.tree_map(np.array, params)
    tree = _bumped(lora.init_lora(jax.random.PRNGKey(1), params, "flux", 2, 2.0), 0.01)
    nan_tree = jax.tree_util.tree_map_with_path(lambda p, x: x * jnp.nan if p[-1].key == "A" else x, tree)
    with pytest.raises(GlanceError, match="holds NaN or infinite values"):
        lora.merge_lora(params, nan_tree, donate=False)
    with pytest.raises(GlanceError, match="more than 64 times its largest weight"):
        lora.merge_lora(params, tree, scale=1e8)  # donated, but refused first: the base stays usable
    huge = jax.tree_util.tree_map_with_path(lambda p, x: x * 1e30 if p[-1].key in ("A", "B") else x, tree)
    with pytest.raises(GlanceError, match="would make layer .* non-finite"):
        lora.merge_lora(params, huge, scale=1.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, keep)


def test_merge_and_unmerge_restore_the_base_within_the_stated_tolerance(base):
    """A LoRA changing kernels by up to 60 times their largest weight (just under the cap) round-trips
    within (1 + MAX_CHANGE) eps max|W| per kernel, the tolerance lora_tree.MAX_CHANGE states."""
    from flax.traverse_util import flatten_dict
    _, params = base
    keep = flatten_dict(jax.tree_util.tree_map(np.array, params))
    tree = _bumped(lora.init_lora(jax.random.PRNGKey(1), params, "flux", 2, 2.0), 0.01)
    modules = lora.modules_of(tree)
    ratios = [float(jnp.max(jnp.abs(m["A"] @ m["B"])) / np.max(np.abs(keep[p + ("kernel",)])))
              for p, m in modules.items()]
    scale = 60.0 / max(ratios)  # alpha / r = 1 here
    restored = flatten_dict(lora.unmerge_lora(lora.merge_lora(params, tree, scale=scale, donate=False), tree,
                                              scale=scale))
    eps = float(jnp.finfo(jnp.float32).eps)
    for path in modules:
        w = keep[path + ("kernel",)]
        error = np.max(np.abs(np.asarray(restored[path + ("kernel",)]) - w))
        assert 0 < error <= (1 + lora_tree.MAX_CHANGE) * eps * np.max(np.abs(w)), path


@pytest.fixture(scope="module")
def pipe(base):
    from glance_jax.pipelines import FluxGlancePipeline
    model, params = base
    return FluxGlancePipeline(model, jax.tree_util.tree_map(jnp.array, params), teacher.SCHEDULER,
                              latent_channels=1, vae_scale_factor=1)


def test_a_pipeline_refuses_a_nan_lora_in_both_modes(base, pipe):
    from glance_jax.schedules import GlanceSchedule
    tree = lora.init_lora(jax.random.PRNGKey(1), base[1], "flux", 2, 2.0)
    nan_tree = jax.tree_util.tree_map_with_path(lambda p, x: x * jnp.nan if p[-1].key == "A" else x, tree)
    schedule = GlanceSchedule.from_steps(teacher.SCHEDULER, (1, 5), (16, 36), image_seq_len=16)
    embeds = {"prompt_embeds": jnp.zeros((1, 4, 384)), "pooled_prompt_embeds": jnp.zeros((1, 384))}
    for mode in ("merge", "unmerged"):
        with pytest.raises(GlanceError, match="slow_lora: layer .* holds NaN"):
            pipe(**embeds, height=8, width=8, schedule=schedule, slow_lora=nan_tree, fast_lora=tree, lora_mode=mode)


def test_a_non_finite_lora_is_never_written(base, tmp_path):
    tree = lora.init_lora(jax.random.PRNGKey(1), base[1], "flux", 2, 2.0)
    tree = jax.tree_util.tree_map_with_path(lambda p, x: x * jnp.inf if p[-1].key == "A" else x, tree)
    with pytest.raises(GlanceError, match="holds .* NaN or infinite value"):
        lora.save_lora(tree, tmp_path / "lora.safetensors")
    assert os.listdir(tmp_path) == []


def test_precomputed_encodings_holding_nan_are_refused(tmp_path):
    Image.fromarray(_gradient()).save(tmp_path / "a.png")
    found, _ = _sample_of(tmp_path / "a.png", 32)
    safetensors_io.save_file({"latents": np.full((found.height, found.width, 4), np.nan, np.float32),
                              "prompt_embeds": np.zeros((3, 8), np.float32)}, tmp_path / "a.safetensors")
    with pytest.raises(GlanceError, match="a.safetensors: latents holds .* NaN or infinite"):
        data.PrecomputedEncoder(4, 8, None, 1).encode(found)


def test_a_schedule_whose_shift_is_not_finite_is_refused():
    with pytest.raises(GlanceError, match="time shift is not finite at image_seq_len=541696"):
        schedules.base_schedule(FLUX_SCHEDULER, 28, (11776 // 16) ** 2)


@pytest.mark.parametrize("config,message", [
    ("{not json", "cannot read JSON"),
    ({"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 256}, "divides by zero"),
    ({"shift": "3"}, "shift='3': must be a finite number > 0"),
    ({"num_train_timesteps": 0}, "num_train_timesteps=0"),
    ([1, 2], "not a JSON object"),
])
def test_a_bad_scheduler_config_is_refused_before_loading(no_heavy_work, tmp_path, capsys, config, message):
    path = tmp_path / "scheduler_config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    one_line(capsys, main(sample(tmp_path / "x.png", "--scheduler", str(path))), message)


@pytest.mark.parametrize("extra,message", [
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 4294967295]"),
    (["--seed", str(2 ** 32)], "--seed 4294967296"),
    (["--height", "8192", "--width", "8192"], "more than --max_pixels 16777216"),
    (["--max_pixels", "0"], "--max_pixels 0"),
])
def test_seeds_and_sizes_are_checked_before_loading(no_heavy_work, tmp_path, capsys, extra, message):
    one_line(capsys, main(sample(tmp_path / "x.png", *extra)), message)
    assert not (tmp_path / "x.png").exists()


# ---- images as the user sees them; text as UTF-8 ----

def _gradient(size=(48, 32)):
    x = np.linspace(0, 255, size[0])[None, :] + np.zeros((size[1], 1))
    return np.stack([x, x[:, ::-1], np.full_like(x, 128)], -1).astype(np.uint8)


def _sample_of(path, resolution=48):
    (path.parent / (path.stem + ".txt")).write_text("a photo")
    found = data.find_samples(str(path.parent), resolution, 16)
    assert len(found) == 1
    return found[0], data.load_image(found[0])


def test_exif_orientation_is_applied(tmp_path):
    rgb = _gradient()
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image.save(tmp_path / "a.jpg", exif=exif, quality=95)
    found, pixels = _sample_of(tmp_path / "a.jpg")
    assert (found.width, found.height) == (32, 48)  # portrait, as a viewer shows it
    viewed = np.asarray(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270), np.float32) / 127.5 - 1
    assert np.abs(pixels - viewed).mean() < 0.05  # JPEG rounding only


@pytest.mark.parametrize("kind", ["I;16", "P", "RGBA", "CMYK", "L", "LA"])
def test_image_modes_become_the_rgb_a_viewer_shows(tmp_path, kind):
    rgb = _gradient()
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if kind == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "a.png")  # 16-bit grey, full range
        want = np.repeat(grey[..., None], 3, -1)
    elif kind == "P":
        Image.fromarray(rgb).quantize(64).save(tmp_path / "a.png")
        want = np.asarray(Image.fromarray(rgb).quantize(64).convert("RGB"))
    elif kind in ("RGBA", "LA"):  # the rule: transparent pixels are composited over white
        alpha = np.zeros(grey.shape, np.uint8)
        alpha[:, :24] = 255
        base = rgb if kind == "RGBA" else np.repeat(grey[..., None], 3, -1)
        Image.fromarray(np.dstack([base if kind == "RGBA" else grey[..., None], alpha])).save(tmp_path / "a.png")
        want = np.where(alpha[..., None] == 255, base, 255)
    elif kind == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(tmp_path / "a.jpg", quality=100)
        want = np.asarray(Image.fromarray(rgb).convert("CMYK").convert("RGB"))
    else:
        Image.fromarray(grey).save(tmp_path / "a.png")
        want = np.repeat(grey[..., None], 3, -1)
    name = "a.jpg" if kind == "CMYK" else "a.png"
    if kind == "I;16":
        assert Image.open(tmp_path / name).mode.startswith("I")
    _, pixels = _sample_of(tmp_path / name)
    got = (pixels + 1) * 127.5
    assert np.abs(got - want.astype(np.float32)).max() <= (6 if kind == "CMYK" else 1.0)


def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, monkeypatch):
    Image.fromarray(_gradient()).save(tmp_path / "bomb.png")
    (tmp_path / "bomb.txt").write_text("a photo")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 48 x 32 image now claims too many pixels
    with pytest.raises(GlanceError, match="claims more than 1000 pixels .*refused before decoding"):
        data.find_samples(str(tmp_path), 32, 16)


@pytest.mark.parametrize("raw,message", [
    ("\ufeffa photo".encode("utf-8"), None),
    ("a photo".encode("utf-16"), "is UTF-16-encoded; save it as UTF-8"),
    ("a café photo".encode("latin-1"), "is not UTF-8 (byte 0xe9 at position 5; probably Latin-1"),
])
def test_captions_are_utf8_with_bom_or_refused(tmp_path, raw, message):
    Image.fromarray(_gradient()).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(raw)
    if message is None:
        assert data.find_samples(str(tmp_path), 32, 16)[0].caption == "a photo"
    else:
        with pytest.raises(GlanceError, match=None) as e:
            data.find_samples(str(tmp_path), 32, 16)
        assert message in str(e.value)


def test_a_prompt_file_in_another_encoding_is_one_line(no_heavy_work, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes((PROMPT + "\n").encode("utf-16"))
    code = main(["eval", "--prompts", str(tmp_path / "prompts.txt"), "--workdir", str(tmp_path / "eval")])
    one_line(capsys, code, "prompts.txt: the prompt file is UTF-16-encoded")
    assert not (tmp_path / "eval").exists()


# ---- the Python API ----

@pytest.mark.parametrize("change,message", [
    ({"pooled_prompt_embeds": jnp.zeros((1, 384))}, "pooled_prompt_embeds has shape (1, 384): 2 rows needed"),
    ({"height": 0}, "height and width must be positive integers, got 0x8"),
    ({"guidance_scale": float("nan")}, "guidance_scale nan: must be a finite number"),
    ({"prompt_embeds": jnp.full((2, 4, 384), jnp.inf)}, "prompt_embeds holds NaN or infinite values"),
    ({"schedule": schedules.GlanceSchedule.from_steps(teacher.SCHEDULER, (1, 5), (16, 36), image_seq_len=16)},
     "not both"),
])
def test_the_pipeline_refuses_what_it_would_broadcast_or_ignore(pipe, change, message):
    good = dict(prompt_embeds=jnp.zeros((2, 4, 384)), pooled_prompt_embeds=jnp.zeros((2, 384)), height=8, width=8,
                num_inference_steps=2)
    assert pipe(**good).shape == (2, 16, 4)
    with pytest.raises(GlanceError, match=None) as e:
        pipe(**{**good, **change})
    assert message in str(e.value)
