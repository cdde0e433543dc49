"""Imports run one way: model <- pipeline <- actors <- deploy <- cli. Every module of every package is parsed (imports
inside functions included, since that is where a cycle hides) and an import of a higher layer fails the test."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"model": 0, "pipeline": 1, "actors": 2, "deploy": 3, "cli": 4}  # a package may import its own and lower


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in `source`, code of a module of dotted `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` is the package itself, each further dot one package up
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                found.append((node.lineno, ".".join([*base, node.module] if node.module else base)))
            else:
                found.append((node.lineno, node.module))
    return found


def upward_imports(path: Path) -> list[str]:
    relative = path.relative_to(ROOT)
    package = ".".join(relative.parent.parts)
    own = LAYERS[relative.parts[0]]
    return [
        f"{relative}:{line}: layer {relative.parts[0]!r} imports {name}"
        for line, name in imported_modules(path.read_text(), package)
        if LAYERS.get(name.split(".")[0], -1) > own
    ]


def test_every_package_has_a_layer():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(pattern.removesuffix("*") for pattern in include) == sorted(LAYERS)
    assert all((ROOT / package / "__init__.py").exists() for package in LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    modules = [path for package in LAYERS for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(modules) > 50  # the walk found the tree
    violations = [line for path in modules for line in upward_imports(path)]
    assert violations == [], "\n".join(violations)


def test_the_check_sees_imports_inside_functions_and_relative_ones():
    source = "import model.config\n\ndef run():\n    from deploy.app import create_app\n    from ..storage import x\n"
    found = sorted(imported_modules(source, "pipeline.commands"))
    assert found == [(1, "model.config"), (4, "deploy.app"), (5, "pipeline.storage")]


def test_evaluation_imports_nothing_from_training():
    """Inside `model`: training may use evaluation (the recipe's VAE gate, the deflicker calibration), not the other
    way round."""
    for path in (ROOT / "model" / "eval").glob("*.py"):
        names = [name for _, name in imported_modules(path.read_text(), "model.eval")]
        assert not [n for n in names if n == "model.train" or n.startswith("model.train.")], path.name
