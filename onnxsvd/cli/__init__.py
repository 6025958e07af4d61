"""The ``onnxsvd`` command line: parse → config → library call → render. No logic of its own.

One module per command (:mod:`~onnxsvd.cli.inspect`, :mod:`~onnxsvd.cli.calibrate`,
:mod:`~onnxsvd.cli.rewrite`, :mod:`~onnxsvd.cli.validate`, :mod:`~onnxsvd.cli.sweep`,
:mod:`~onnxsvd.cli.finetune`), the shared options (:mod:`~onnxsvd.cli.options`), the rendering
(:mod:`~onnxsvd.cli.render`), and the group with its entry point (:mod:`~onnxsvd.cli.main`).

A command module imports click, rich and the light :mod:`onnxsvd.config` at its top, and the library
(numpy, onnx, onnxruntime, scipy, torch behind it) inside the command's function, when it runs: so
``onnxsvd --help`` and every command's ``--help`` start in about a tenth of a second
(``tools/bench_cli.py``; ``tests/test_cli_startup.py`` holds it).
"""

from __future__ import annotations

import os

# Calibration and the sequential rewrite alternate ONNX Runtime runs with BLAS on the same cores.
# OpenBLAS's idle threads spin for about 0.1 s (2^28 cycles) after every call, which slowed each following
# ONNX Runtime run; 2^20 cycles (under a millisecond) keeps them warm between back-to-back BLAS calls
# only. It must be set before numpy loads OpenBLAS, so the CLI sets it first (a value already set wins);
# the library sets no environment variable.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from onnxsvd.cli.main import cli, main  # noqa: E402 - after the environment, before numpy

__all__ = ["cli", "main"]
