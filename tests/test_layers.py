"""The library's layers import downward only (docs/architecture.md, "Layers").

Every import statement counts, module-level or inside a function, as the shared
``import_cycles.py`` tool reads them. A module may import its own layer or lower ones."""

from __future__ import annotations

import ast
import os

from tests.conftest import ROOT

# lowest first; a module's layer is that of the longest matching prefix
LAYERS: list[tuple[str, ...]] = [
    ("mmflow", "mmflow.storage", "mmflow.progress", "mmflow.params", "mmflow.redact"),
    ("mmflow.stage", "mmflow.config", "mmflow.tracking", "mmflow.plugins", "mmflow.lease"),
    ("mmflow.data", "mmflow.io", "mmflow.models", "mmflow.train", "mmflow.eval"),
    ("mmflow.tasks", "mmflow.export", "mmflow.generate", "mmflow.decode"),
    ("mmflow.stages",),
    (
        "mmflow.plan",
        "mmflow.ray_env",
        "mmflow.console",
        "mmflow.runner",
        "mmflow.cli",
        "mmflow.ui_app",
    ),
]


def layer_of(module: str) -> int:
    best, level = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, level = len(name), i
    return level


def imports(path: str, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
    return [(line, m) for line, m in out if m == "mmflow" or m.startswith("mmflow.")]


def library_modules():
    for folder, _, files in os.walk(os.path.join(ROOT, "mmflow")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def test_every_library_module_has_a_layer():
    assert [m for _, m in library_modules() if layer_of(m) < 0] == []


def test_imports_go_downward_only():
    upward = []
    for path, module in library_modules():
        for line, target in imports(path, module):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


def test_models_know_nothing_of_stages():
    bad = [
        f"{m}:{line} imports {t}"
        for path, m in library_modules()
        if m.startswith("mmflow.models")
        for line, t in imports(path, m)
        if t in ("mmflow.stage", "mmflow.config") or t.startswith("mmflow.stages")
    ]
    assert bad == []
