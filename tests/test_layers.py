"""The package's layers hold in ``import`` terms.

Every module of ``gpgrad`` belongs to one layer; a module may import from its
own layer and the layers below it, never from one above. Imports are read
with ``ast`` from the source (module level, inside functions, and under
``if TYPE_CHECKING``), so an import hidden in a function counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpgrad"

# Lowest first. A name covers the module and, for a package, everything in it.
LAYERS = [
    (
        "backend",
        [
            "gpgrad.backend",
            "gpgrad.exceptions",
            "gpgrad._version",
            "gpgrad._typing",
            "gpgrad._validate",
            "gpgrad.distributed",  # where the solvers' products run (ranks, devices)
        ],
    ),
    ("kernels", ["gpgrad.kernels"]),
    ("functionals, covariance", ["gpgrad.functionals", "gpgrad.covariance"]),
    ("solvers", ["gpgrad.solvers"]),
    ("gp, posterior", ["gpgrad.gp", "gpgrad.posterior", "gpgrad.likelihood"]),
    ("fit, acquisition, io", ["gpgrad.fit", "gpgrad.acquisition", "gpgrad.io"]),
    (
        "interfaces",
        [
            "gpgrad",  # the package's __init__: the public API, re-exported
            "gpgrad.__main__",
            "gpgrad.interop",
            "gpgrad.cli",
            "gpgrad.auto",
            "gpgrad.sklearn",
        ],
    ),
]

# Imports that break the layering today, each with the reason it exists. The
# list is meant to shrink to nothing; an entry that is no longer needed fails
# test_allowed_violations_are_still_needed, so it cannot go stale.
ALLOWED: set = set()


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``: its longest matching name."""
    best, best_len = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name or (
                name != "gpgrad" and module.startswith(name + ".")
            )
            if covers and len(name) > best_len:
                best, best_len = i, len(name)
    if best is None:
        raise LookupError(
            f"module {module} has no layer: add it to LAYERS in tests/test_layers.py"
        )
    return best


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, root: Path) -> str:
    """``name`` if it is a module or package of the tree, else its parent (the
    name was a function or class imported from it)."""
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    base = root / rel
    if name == root.name or base.with_suffix(".py").exists() or base.is_dir():
        return name
    return name.rpartition(".")[0]


def imports_of(source: str, module: str, is_package: bool, root: Path = PACKAGE):
    """The package's modules that ``source`` (of ``module``) imports, with the
    line of each import."""
    pkg = module if is_package else module.rpartition(".")[0]
    top = root.name
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t == top or t.startswith(top + "."):
                found.append((_resolve(t, root), node.lineno))
    return found


def violations(root: Path = PACKAGE):
    """(module, imported module, line) for every import from a higher layer."""
    out = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        here = layer_of(mod)
        for target, line in imports_of(
            path.read_text(encoding="utf-8"), mod, path.name == "__init__.py", root
        ):
            if layer_of(target) > here:
                out.append((mod, target, line))
    return out


def test_every_module_has_a_layer():
    for path in sorted(PACKAGE.rglob("*.py")):
        layer_of(module_name(path))  # raises with a message naming the module


def test_no_module_imports_from_a_layer_above():
    found = [
        f"{mod} (layer {LAYERS[layer_of(mod)][0]!r}) imports {target} "
        f"(layer {LAYERS[layer_of(target)][0]!r}) at line {line}"
        for mod, target, line in violations()
        if (mod, target) not in ALLOWED
    ]
    assert not found, "imports from a higher layer:\n" + "\n".join(found)


def test_allowed_violations_are_still_needed():
    current = {(mod, target) for mod, target, _ in violations()}
    stale = sorted(ALLOWED - current)
    assert not stale, f"remove from ALLOWED (no longer imported): {stale}"


def _tree(tmp_path, files):
    root = tmp_path / "gpgrad"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    root = _tree(
        tmp_path,
        {
            "__init__.py": "from .gp import GP\n",
            "backend.py": "",
            "gp.py": "from . import backend\nfrom .kernels import base\n",
            "kernels/__init__.py": "from .base import Kernel\n",
            "kernels/base.py": (
                "from .. import backend as B\n"
                "def f():\n"
                "    from ..gp import GP\n"  # up two layers, inside a function
                "    import gpgrad.solvers.dense\n"
                "    return GP\n"
            ),
            "solvers/__init__.py": "",
            "solvers/dense.py": "from gpgrad.covariance import covariance\n",
            "covariance.py": "from .kernels.base import Kernel\n",
        },
    )
    got = sorted((m, t) for m, t, _ in violations(root))
    assert got == [
        ("gpgrad.kernels.base", "gpgrad.gp"),
        ("gpgrad.kernels.base", "gpgrad.solvers.dense"),
    ]


def test_unknown_module_is_reported(tmp_path):
    root = _tree(tmp_path, {"__init__.py": "", "newthing.py": ""})
    with pytest.raises(LookupError, match="module gpgrad.newthing has no layer"):
        violations(root)
