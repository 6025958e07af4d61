"""onnxsvd: shrink ONNX models without retraining by replacing constant-weight MatMul/Gemm layers with
SVD low-rank factor chains (plain, residual, activation-aware), validated with ONNX Runtime.

Library use::

    import onnx, onnxsvd
    result = onnxsvd.rewrite(onnx.load("model.onnx"), onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("ratio", 0.5)))
    onnx.save(result.model, "small.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# Calibration and the sequential rewrite alternate ONNX Runtime runs with BLAS on the same cores.
# OpenBLAS's idle threads spin for about 0.1 s (2^28 cycles) after every call, which slowed each following
# ONNX Runtime run; 2^20 cycles (under a millisecond) keeps them warm between back-to-back BLAS calls
# only. Takes effect when onnxsvd is imported before numpy (as the CLI does); a value already set wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from onnxsvd.analysis import Inspection, inspect_model
from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.errors import OnnxSvdError
from onnxsvd.report import RewriteReport, SiteReport
from onnxsvd.rewrite import RewriteResult, rewrite, rewrite_file

__all__ = [
    "__version__",
    "Inspection",
    "OnnxSvdError",
    "RankPolicy",
    "RewriteConfig",
    "RewriteReport",
    "RewriteResult",
    "SiteReport",
    "inspect_model",
    "rewrite",
    "rewrite_file",
]
