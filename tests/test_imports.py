"""No import cycles in glance_jax: every module imports alone in a fresh interpreter, and the graph of the
imports modules make when they load (their top-level `import` statements) has no cycle."""

import ast
import os
import subprocess
import sys

import glance_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(glance_jax.__file__)))
PACKAGE = os.path.join(ROOT, "glance_jax")


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


def load_time_imports(path, known):
    """The glance_jax modules a file imports at load time: statements at module level, not inside functions."""
    targets = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("glance_jax"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            targets |= submodules or {node.module}
    return targets


def test_no_import_cycle():
    known = modules()
    graph = {name: load_time_imports(path, known) for name, path in known.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail + [name])
        state[name] = "open"
        for target in sorted(graph[name]):
            visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


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
