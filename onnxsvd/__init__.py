"""onnxsvd: shrink ONNX models without retraining by replacing constant-weight MatMul/Gemm layers with
SVD low-rank factor chains (plain, residual, activation-aware), validated with ONNX Runtime.

Library use::

    import onnx, onnxsvd
    result = onnxsvd.rewrite(onnx.load("model.onnx"), onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("ratio", 0.5)))
    onnx.save(result.model, "small.onnx")

Importing the package has no side effects and loads nothing heavy: each name below is imported from its
module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxsvd.config import VERSION as __version__
from onnxsvd.exports import lazy_exports

#: Public name → the module that defines it (imported on first access).
_EXPORTS = {
    "Inspection": "onnxsvd.pipeline.inspect",
    "inspect_model": "onnxsvd.pipeline.inspect",
    "RankPolicy": "onnxsvd.config",
    "RewriteConfig": "onnxsvd.config",
    "QuantizeConfig": "onnxsvd.config",
    "OnnxSvdError": "onnxsvd.errors",
    "RewriteReport": "onnxsvd.pipeline.report",
    "SiteReport": "onnxsvd.pipeline.report",
    "RewriteResult": "onnxsvd.pipeline.assemble",
    "rewrite": "onnxsvd.pipeline.oneshot",
    "rewrite_sequential": "onnxsvd.pipeline.sequential",
    "RewriteJob": "onnxsvd.files",
    "rewrite_file": "onnxsvd.files",
    "rewrite_quantized": "onnxsvd.pipeline.quantized",
    "ExtractConfig": "onnxsvd.pipeline.extract",
    "ExtractReport": "onnxsvd.pipeline.extract",
    "extract": "onnxsvd.pipeline.extract",
}

__all__ = [
    "__version__",
    "ExtractConfig",
    "ExtractReport",
    "Inspection",
    "OnnxSvdError",
    "QuantizeConfig",
    "RankPolicy",
    "RewriteConfig",
    "RewriteJob",
    "RewriteReport",
    "RewriteResult",
    "SiteReport",
    "extract",
    "inspect_model",
    "rewrite",
    "rewrite_file",
    "rewrite_quantized",
    "rewrite_sequential",
]

if TYPE_CHECKING:
    from onnxsvd.config import QuantizeConfig, RankPolicy, RewriteConfig
    from onnxsvd.errors import OnnxSvdError
    from onnxsvd.files import RewriteJob, rewrite_file
    from onnxsvd.pipeline.assemble import RewriteResult
    from onnxsvd.pipeline.extract import ExtractConfig, ExtractReport, extract
    from onnxsvd.pipeline.inspect import Inspection, inspect_model
    from onnxsvd.pipeline.oneshot import rewrite
    from onnxsvd.pipeline.quantized import rewrite_quantized
    from onnxsvd.pipeline.report import RewriteReport, SiteReport
    from onnxsvd.pipeline.sequential import rewrite_sequential


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
