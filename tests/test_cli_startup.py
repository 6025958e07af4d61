"""Start-up stays light: ``--help`` of every command, and importing the packages, load none of the heavy
libraries (they load inside the command that runs). ``tools/bench_cli.py`` times it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
