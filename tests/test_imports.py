"""The import graph of glance_jax: no cycle (deferred imports included), every import points down the layers,
and every module imports alone in a fresh interpreter.

Layers, lowest first (a module may import its own layer and those below; a package's `__init__` is in its
modules' layer or below, since importing a module runs its packages first):
- core: errors, layout, safe_io, schedules, quantize, sharding, LoRA trees, input checks;
- checkpoints: reading and writing tensors by name (safetensors, the hub, the loader, the converter), for any model;
- models: the shared building blocks (modules/) and each family's Flax models, and the public facade `models`;
- io: files that need a family's names: LoRA files, prompt encoding (tokenizers and text encoders);
- app: the family records and their registry, pipelines, the trainer, the planner, the commands, the demo.
"""

import ast
import fnmatch
import os
import subprocess
import sys

import glance_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(glance_jax.__file__)))
PACKAGE = os.path.join(ROOT, "glance_jax")

LAYERS = (  # (layer, module patterns); the first layer whose patterns match a module is its layer
    ("core", ("glance_jax", "glance_jax.errors", "glance_jax.layout", "glance_jax.safe_io", "glance_jax.schedules",
              "glance_jax.quantize", "glance_jax.sharding", "glance_jax.lora_tree", "glance_jax.analysis",
              "glance_jax.validation")),
    ("checkpoints", ("glance_jax.checkpoints", "glance_jax.checkpoints.*")),
    ("models", ("glance_jax.modules", "glance_jax.modules.*", "glance_jax.models", "glance_jax.*.transformer",
                "glance_jax.*.vae", "glance_jax.*.text_encoder", "glance_jax.*.text_encoders", "glance_jax.*.bfl",
                "glance_jax.flux", "glance_jax.qwen_image",
                "glance_jax.qwen_image_edit", "glance_jax.qwen_image_edit.vision")),
    ("io", ("glance_jax.lora_formats", "glance_jax.*.lora_names", "glance_jax.prompts", "glance_jax.*.prompts",
            "glance_jax.qwen_image_edit.processor")),
    ("app", ("glance_jax.*",)),
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def layer(module):
    return next(name for name, patterns in LAYERS if any(fnmatch.fnmatchcase(module, p) for p in patterns))


def modules():
    """Every module of glance_jax by dotted name, with its file."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports(path, known):
    """The glance_jax modules a file imports, wherever the statement is (at the top or inside a function)."""
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("glance_jax"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            targets |= submodules or {node.module}
    return targets


def graph():
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_no_import_cycle():
    edges, state = graph(), {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for target in sorted(edges[name]):
            visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(edges):
        visit(name, [])


def test_imports_point_down_the_layers():
    edges = graph()
    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in sorted(edges.items())
              for t in sorted(targets) if RANK[layer(t)] > RANK[layer(m)]]
    parents = [f"{m} ({layer(m)}) runs its package {p} ({layer(p)})" for m in sorted(edges)
               for p in (m.rsplit(".", k)[0] for k in range(1, m.count(".") + 1)) if RANK[layer(p)] > RANK[layer(m)]]
    assert not upward + parents, upward + parents
    assert {layer(m) for m in edges} == set(RANK)  # every layer holds modules: the table is not stale


def test_every_module_imports_alone():
    names = sorted(n for n in modules() if not n.endswith("__main__"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = {}
    for i in range(0, len(names), 4):  # four interpreters at a time (each loads jax)
        running = [(n, subprocess.Popen([sys.executable, "-c", f"import {n}"], env=env, stderr=subprocess.PIPE,
                                        text=True)) for n in names[i:i + 4]]
        for n, process in running:
            error = process.communicate()[1]
            if process.returncode:
                failed[n] = error.strip().splitlines()[-1:]
    assert len(names) > 20 and not failed, failed
