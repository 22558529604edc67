"""The architecture as the code states it: import names are file paths, imports only run down
the layers (front end -> repository -> cluster -> engine -> common), and the front end runs
without torch or transformers."""
import ast
import os
import subprocess
import sys

from pdserve_testing.harness import ROOT

PACKAGE = os.path.join(ROOT, "server", "pdserve")
LAYERS = {"common": 0, "engine": 1, "cluster": 2, "repository": 3, "frontend": 4, "cli": 5}


def modules():
    for folder, _, files in os.walk(PACKAGE):
        if "_proto" in folder or "__pycache__" in folder:
            continue
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                yield path, ".".join(p for p in parts if p != "__init__")


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_import_resolves_to_its_file_and_runs_down_the_layers():
    known = {name for _, name in modules()}
    upward = []
    for path, name in modules():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdserve"):
                target = node.module
                if not target.startswith("pdserve._proto"):
                    assert target in known or f"{target}.__init__" in known, f"{name} imports {target}: no such file"
                mine, theirs = layer(name), layer(target)
                if mine is not None and theirs is not None and theirs > mine:
                    upward.append(f"{name} -> {target}")
    assert upward == []


def test_the_front_end_imports_neither_torch_nor_transformers():
    code = ("import sys, pdserve.frontend.service, pdserve.frontend.metrics, pdserve.cli; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
