"""Validation of a rewrite: accuracy per output, latency per provider, size, and the speedup bound.

Library use::

    from onnxsvd.validate import ValidateConfig, validate
    report = validate("model.onnx", "small.onnx", "eval.npz", ValidateConfig(providers=("cpu",)))
    print(report.outputs[0].cosine, report.speed[0].timing.speedup, report.speed[0].bound)

The ``onnxsvd validate`` command is in :mod:`onnxsvd.cli.validate` (imported
explicitly by the CLI, not here, so the library does not pull in click or rich).
"""

from __future__ import annotations

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
    PROFILE_RUNS,
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
from onnxsvd.validate.report import GateResult, ProviderSpeed, ValidateConfig, ValidationReport, check_gate

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
