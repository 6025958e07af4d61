"""One model in memory: match → plan ranks → factorize → keep-dense checks → emit, and the report.

- :mod:`~onnxsvd.pipeline.group`: the work on one weight group (:func:`factor_group`, :class:`GroupOutcome`).
- :mod:`~onnxsvd.pipeline.oneshot`: :func:`rewrite`, every group fitted to the original activations.
- :mod:`~onnxsvd.pipeline.sequential`: :func:`rewrite_sequential`, level by level against the partly
  compressed model's own activations.
- :mod:`~onnxsvd.pipeline.quantized`: :func:`rewrite_quantized`, each weight quantized by ONNX Runtime with
  a low-rank correction of its error (one-shot or sequential).
- :mod:`~onnxsvd.pipeline.allocation`: global allocation (spectra, measured sensitivities, one budget).
- :mod:`~onnxsvd.pipeline.speed`: the per-site speed guard (``--keep-dense-if-slower``).
- :mod:`~onnxsvd.pipeline.assemble` and :mod:`~onnxsvd.pipeline.report`: emitting the outcomes and
  reporting every site.
- :mod:`~onnxsvd.pipeline.inspect`: what a rewrite would see (sites, spectra, skips), without rewriting.
"""

from __future__ import annotations

from onnxsvd.pipeline.assemble import RewriteResult
from onnxsvd.pipeline.group import GroupOutcome, SpeedCheck
from onnxsvd.pipeline.inspect import Inspection, inspect_model
from onnxsvd.pipeline.oneshot import rewrite
from onnxsvd.pipeline.quantized import rewrite_quantized
from onnxsvd.pipeline.report import RewriteReport, SiteReport
from onnxsvd.pipeline.sequential import rewrite_sequential

__all__ = [
    "GroupOutcome",
    "Inspection",
    "RewriteReport",
    "RewriteResult",
    "SiteReport",
    "SpeedCheck",
    "inspect_model",
    "rewrite",
    "rewrite_quantized",
    "rewrite_sequential",
]
