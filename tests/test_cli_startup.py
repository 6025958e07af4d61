"""Start-up stays light: ``--help`` of every command, and importing the packages, load none of the heavy
libraries (they load inside the command that runs). ``tools/bench_cli.py`` times it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

#: Loaded only by the commands that use them (rich is the CLI's own renderer, and stays).
HEAVY = ("numpy", "onnx", "onnxruntime", "torch", "scipy", "matplotlib", "ml_dtypes")

COMMANDS = ("inspect", "calibrate", "rewrite", "validate", "sweep", "finetune")


def loaded_after(code: str) -> list[str]:
    """The :data:`HEAVY` modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = (
        "import contextlib, io, json, sys\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    {code}\n"
        f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], *([command, "--help"] for command in COMMANDS)],
                         ids=lambda args: " ".join(args))
def test_help_loads_no_heavy_library(args: list[str]) -> None:
    assert loaded_after(f"from onnxsvd.cli import main; main({args!r})") == []


@pytest.mark.parametrize("package", ["onnxsvd", "onnxsvd.validate", "onnxsvd.finetune", "onnxsvd.config"])
def test_importing_a_package_loads_no_heavy_library(package: str) -> None:
    assert loaded_after(f"import {package}") == []


def test_the_lazy_names_resolve() -> None:
    """Every name the lazy packages export is there on first use (a typo would only fail then)."""
    import onnxsvd.finetune
    import onnxsvd.validate

    for package in (onnxsvd.validate, onnxsvd.finetune):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"


def test_no_module_imports_a_name_from_the_package_root() -> None:
    """Imports run one way: the root re-exports the library, so a module that takes a name from it (not a
    submodule: ``from onnxsvd import io`` is fine) imports upwards. The version lives in config.py."""
    import pkgutil

    import onnxsvd

    submodules = {module.name for module in pkgutil.iter_modules(onnxsvd.__path__)}
    upward = []
    for source in (REPO / "onnxsvd").rglob("*.py"):
        if source.parent == REPO / "onnxsvd" and source.name in ("__init__.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "onnxsvd" and node.level == 0:
                upward += [f"{source.relative_to(REPO)}: {alias.name}" for alias in node.names
                           if alias.name not in submodules]
    assert upward == []


def test_the_version_is_stamped_and_matches_the_package() -> None:
    import onnx

    import onnxsvd
    from onnxsvd.config import VERSION
    from tests.models import matmul_case

    case = matmul_case(np.random.default_rng(0), k=16, n=8)
    result = onnxsvd.rewrite(case.model, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 2)))
    stamped = {prop.key: prop.value for prop in result.model.metadata_props}
    assert stamped["onnxsvd.version"] == VERSION == onnxsvd.__version__
    onnx.checker.check_model(result.model, full_check=True)


def _top_level_imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_are_top_level_unless_they_load_an_optional_heavy_library() -> None:
    """Imports run one way, so a module can import what it needs at its top. Inside a function, an onnxsvd
    import is there only to defer torch or matplotlib (optional extras); the CLI defers the whole library
    to the command bodies (``--help`` stays light), so it is not checked here."""
    optional = {"torch", "matplotlib"}
    package = REPO / "onnxsvd"
    trees = {source: ast.parse(source.read_text(encoding="utf-8")) for source in package.rglob("*.py")}
    by_module = {
        ".".join(source.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): tree
        for source, tree in trees.items()
    }
    deferred = []
    for source, tree in trees.items():
        if (package / "cli") in source.parents:
            continue
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxsvd"):
                    target = by_module.get(node.module)
                    if target is None or not _top_level_imports(target) & optional:
                        deferred.append(f"{source.relative_to(REPO)}:{node.lineno} from {node.module}")
    assert deferred == []
