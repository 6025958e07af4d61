"""Validation of a rewrite: accuracy per output, latency per provider, size, and the speedup bound.

Library use::

    from onnxsvd.validate import ValidateConfig, validate
    report = validate("model.onnx", "small.onnx", "eval.npz", ValidateConfig(providers=("cpu",)))
    print(report.outputs[0].cosine, report.speed[0].timing.speedup, report.speed[0].bound)

The ``onnxsvd validate`` command is in :mod:`onnxsvd.cli.validate` (imported
explicitly by the CLI, not here, so the library does not pull in click or rich).

Importing this package loads nothing heavy: each name below is imported from its module on first use
(so ``onnxsvd --help`` starts without numpy, onnx or onnxruntime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxsvd.exports import lazy_exports

#: Public name → the module that defines it (imported on first access).
_EXPORTS = {
    "LatencyStats": "onnxsvd.validate.latency",
    "ProviderTiming": "onnxsvd.validate.latency",
    "execution_provider": "onnxsvd.validate.latency",
    "make_runner": "onnxsvd.validate.latency",
    "open_session": "onnxsvd.validate.latency",
    "time_models": "onnxsvd.validate.latency",
    "MetricAccumulator": "onnxsvd.validate.metrics",
    "OutputMetrics": "onnxsvd.validate.metrics",
    "compare_outputs": "onnxsvd.validate.metrics",
    "looks_like_class_scores": "onnxsvd.validate.metrics",
    "compare_accuracy": "onnxsvd.validate.pipeline",
    "factorized_sites_from_report": "onnxsvd.validate.pipeline",
    "validate": "onnxsvd.validate.pipeline",
    "PROFILE_RUNS": "onnxsvd.config",
    "OriginalProfile": "onnxsvd.validate.profile",
    "ProfileCache": "onnxsvd.validate.profile",
    "SiteCost": "onnxsvd.validate.profile",
    "SiteFlops": "onnxsvd.validate.profile",
    "SizeSummary": "onnxsvd.validate.profile",
    "TimeShare": "onnxsvd.validate.profile",
    "factorized_sites": "onnxsvd.validate.profile",
    "parse_trace": "onnxsvd.validate.profile",
    "profile_original": "onnxsvd.validate.profile",
    "profile_time_share": "onnxsvd.validate.profile",
    "run_shares": "onnxsvd.validate.profile",
    "site_flops": "onnxsvd.validate.profile",
    "size_summary": "onnxsvd.validate.profile",
    "speedup_bound": "onnxsvd.validate.profile",
    "GateResult": "onnxsvd.validate.report",
    "ProviderSpeed": "onnxsvd.validate.report",
    "ValidateConfig": "onnxsvd.config",
    "ValidationReport": "onnxsvd.validate.report",
    "check_gate": "onnxsvd.validate.report",
}

__all__ = [
    "PROFILE_RUNS",
    "GateResult",
    "LatencyStats",
    "MetricAccumulator",
    "OriginalProfile",
    "OutputMetrics",
    "ProfileCache",
    "ProviderSpeed",
    "ProviderTiming",
    "SiteCost",
    "SiteFlops",
    "SizeSummary",
    "TimeShare",
    "ValidateConfig",
    "ValidationReport",
    "check_gate",
    "compare_accuracy",
    "compare_outputs",
    "execution_provider",
    "factorized_sites",
    "factorized_sites_from_report",
    "looks_like_class_scores",
    "make_runner",
    "open_session",
    "parse_trace",
    "profile_original",
    "profile_time_share",
    "run_shares",
    "site_flops",
    "size_summary",
    "speedup_bound",
    "time_models",
    "validate",
]

if TYPE_CHECKING:
    from onnxsvd.config import PROFILE_RUNS, ValidateConfig
    from onnxsvd.validate.latency import (
        LatencyStats,
        ProviderTiming,
        execution_provider,
        make_runner,
        open_session,
        time_models,
    )
    from onnxsvd.validate.metrics import MetricAccumulator, OutputMetrics, compare_outputs, looks_like_class_scores
    from onnxsvd.validate.pipeline import compare_accuracy, factorized_sites_from_report, validate
    from onnxsvd.validate.profile import (
        OriginalProfile,
        ProfileCache,
        SiteCost,
        SiteFlops,
        SizeSummary,
        TimeShare,
        factorized_sites,
        parse_trace,
        profile_original,
        profile_time_share,
        run_shares,
        site_flops,
        size_summary,
        speedup_bound,
    )
    from onnxsvd.validate.report import GateResult, ProviderSpeed, ValidationReport, check_gate


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
