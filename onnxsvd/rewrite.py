"""The rewrite pass: match → plan ranks → factorize → emit, with a report of every site.

``rewrite(model, config)`` works on a ``ModelProto`` in memory and never mutates its argument;
``rewrite_file`` adds loading, output checks, atomic saving and file sizes.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate.stats import ActivationStats, Statistics, combine
from onnxsvd.config import RewriteConfig
from onnxsvd.errors import FactorizationError, StatsError, UsageError
from onnxsvd.factorize import (
    Decomposition,
    Factorization,
    Metric,
    decompose,
    diagonal_metric,
    identity_metric,
    split_rank,
    truncate,
    whitening_metric,
)
from onnxsvd.graph import EmitOptions, GraphIndex, Site, emit, find_sites, load_weight, storage_dtype_for
from onnxsvd.rank import choose_rank
from onnxsvd.report import RewriteReport, SiteReport

__all__ = ["RewriteResult", "rewrite", "rewrite_file", "metric_for"]

log = logging.getLogger(__name__)

#: Called after each weight group with (done, total, site name).
Progress = Callable[[int, int, str], None]


class RewriteResult:
    """The rewritten model and its report."""

    def __init__(self, model: onnx.ModelProto, report: RewriteReport) -> None:
        self.model = model
        self.report = report


def metric_for(config: RewriteConfig, stats: ActivationStats | None) -> Metric:
    """The data metric of a method: identity (svd), diagonal (asvd) or whitening (whiten).

    Raises:
        FactorizationError: the statistics are degenerate (the site stays dense).
    """
    if config.method == "svd":
        return identity_metric()
    if stats is None:
        raise FactorizationError("no calibration statistics for this activation")
    if stats.rows == 0:
        raise FactorizationError("degenerate statistics: no calibration rows")
    if config.method == "asvd":
        return diagonal_metric(stats.mean_abs, alpha=config.alpha)
    return whitening_metric(stats.gram, damping=config.damping)


def _group_statistics(sites: list[Site], statistics: Statistics | None) -> ActivationStats | None:
    if statistics is None:
        return None
    parts = [statistics.activations.get(site.activation) for site in sites]
    if any(part is None for part in parts):
        return None
    parts = [p for p in parts if p is not None]
    if any(p.channels != sites[0].k for p in parts):
        raise StatsError(
            f"statistics for {sites[0].activation!r} have {parts[0].channels} channels, the layer has "
            f"{sites[0].k}; re-run 'onnxsvd calibrate' on this model"
        )
    return combine(parts)


def _stage_ranks(config: RewriteConfig, total: int) -> list[int]:
    stages = min(config.stages, total)
    return split_rank(total, stages)


def _plan_group(
    sites: list[Site],
    weight: np.ndarray,
    config: RewriteConfig,
    stats: ActivationStats | None,
    storage: np.dtype,
) -> tuple[Factorization | None, Decomposition | None, str, list[int]]:
    """Factorize one weight group, or say why it stays dense."""
    site = sites[0]
    metric = metric_for(config, stats)
    decomposition = decompose(weight, metric)
    if config.stage_ranks is not None:
        ranks = list(config.stage_ranks)
        total = sum(ranks)
        limit = min(site.k, site.n)
        if total > limit:
            return None, decomposition, f"--stage-ranks sum {total} exceeds min(K, N) = {limit}", []
        if total * (site.k + site.n) >= site.params and not config.policy.allow_growth:
            return None, decomposition, (
                f"--stage-ranks sum {total} ≥ break-even (r·(K+N) ≥ K·N); use --allow-growth to force"
            ), []
        how = f"stage ranks {','.join(map(str, ranks))}"
    else:
        decision = choose_rank(config.policy, site.k, site.n, decomposition.s)
        if decision.dense:
            return None, decomposition, decision.reason, []
        ranks = _stage_ranks(config, decision.rank)
        how = decision.reason
    return truncate(decomposition, ranks, storage), decomposition, how, ranks


def rewrite(
    model: onnx.ModelProto,
    config: RewriteConfig | None = None,
    statistics: Statistics | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> RewriteResult:
    """Replace every eligible MatMul/Gemm of ``model`` by a low-rank factor chain.

    Args:
        model: the model; not modified.
        config: policy, method, layout (defaults: plain SVD, ratio 0.5, fused).
        statistics: calibration statistics of this model (required by ``asvd`` and ``whiten``).
        base_dir: folder of the model file, for external data.
        progress: optional callback after each weight.

    Returns:
        The rewritten model and a report of every MatMul/Gemm.

    Raises:
        UsageError: an activation-aware method without statistics.
        StatsError: statistics of another model.
    """
    config = config or RewriteConfig()
    started = time.perf_counter()
    if config.needs_statistics and statistics is None:
        raise UsageError(f"--method {config.method} needs calibration data: pass --stats stats.npz or --data DATA")
    if statistics is not None and statistics.fingerprint != io.fingerprint(model):
        raise StatsError(
            "the statistics were collected on another model (fingerprint mismatch); "
            "re-run 'onnxsvd calibrate' on this model"
        )
    params_before = io.count_parameters(model)
    model = copy.deepcopy(model)
    match = find_sites(model, config)
    index = GraphIndex(model.graph)
    groups: OrderedDict[str, list[Site]] = OrderedDict()
    for site in match.sites:
        groups.setdefault(site.group, []).append(site)

    reports: dict[int, SiteReport] = {}
    factorizations: dict[str, Factorization] = {}
    storage_dtypes: dict[str, int] = {}
    to_emit: list[Site] = []
    base = str(base_dir) if base_dir is not None else None
    for done, (group, sites) in enumerate(groups.items(), start=1):
        site = sites[0]
        tick = time.perf_counter()
        storage = storage_dtype_for(site, config.dtype)
        factorization: Factorization | None = None
        weight_error: float | None = None
        kept_energy: float | None = None
        ranks: list[int] = []
        try:
            weight = load_weight(index, site, base)  # [K, N]
            stats = _group_statistics(sites, statistics)
            factorization, decomposition, reason, ranks = _plan_group(
                sites, weight, config, stats, onnx.helper.tensor_dtype_to_np_dtype(storage)
            )
            if factorization is not None:
                norm = float(np.linalg.norm(weight))
                difference = float(np.linalg.norm(weight - factorization.product()))
                weight_error = difference / norm if norm > 0 else 0.0
                kept_energy = factorization.kept_energy
                if not np.isfinite(weight_error):
                    factorization, reason = None, "factors overflow the storage dtype (NaN/Inf)"
        except FactorizationError as error:
            reason = str(error)
        seconds = time.perf_counter() - tick
        names = [s.name for s in sites]
        for member in sites:
            if factorization is not None:
                rank = factorization.rank
                reports[member.node_index] = SiteReport(
                    name=member.name,
                    op_type=member.op_type,
                    shape=[member.k, member.n],
                    action="factorized",
                    reason=reason,
                    rank=rank,
                    stage_ranks=ranks,
                    params_before=member.params,
                    params_after=rank * (member.k + member.n),
                    kept_energy=kept_energy,
                    weight_error=weight_error,
                    shared_with=[n for n in names if n != member.name],
                    seconds=seconds,
                )
            else:
                reports[member.node_index] = SiteReport(
                    name=member.name,
                    op_type=member.op_type,
                    shape=[member.k, member.n],
                    action="kept",
                    reason=reason,
                    params_before=member.params,
                    params_after=member.params,
                    shared_with=[n for n in names if n != member.name],
                    seconds=seconds,
                )
        if factorization is not None:
            factorizations[group] = factorization
            storage_dtypes[group] = storage
            to_emit.extend(sites)
        log.debug("%s %s: %s", site.name, reports[site.node_index].action, reason)
        if progress is not None:
            progress(done, len(groups), site.name)
    for skip in match.skips:
        params = int(np.prod(skip.shape)) if skip.shape else 0
        reports[skip.node_index] = SiteReport(
            name=skip.name,
            op_type=skip.op_type,
            shape=list(skip.shape) if skip.shape and len(skip.shape) == 2 else None,
            action="kept",
            reason=skip.reason,
            params_before=params,
            params_after=params,
        )
    if to_emit:
        emit(model, factorizations, to_emit, storage_dtypes, EmitOptions(layout=config.layout))
        _stamp(model, config)
    notes = []
    if config.stages > 1:
        notes.append(
            "residual stages: with exact float factors they equal one SVD of the summed rank (Eckart–Young); "
            "they differ only through the rounding of earlier stages to the storage dtype"
        )
    report = RewriteReport(
        input=None,
        output=None,
        method=config.method,
        policy=config.policy.describe() if config.stage_ranks is None else f"stage ranks {list(config.stage_ranks)}",
        layout=config.layout,
        stages=config.stages,
        params_before=params_before,
        params_after=io.count_parameters(model),
        sites=[reports[position] for position in sorted(reports)],
        seconds=time.perf_counter() - started,
        notes=notes,
    )
    log.info(
        "factorized %d of %d MatMul/Gemm nodes; parameters %d → %d",
        len(report.factorized),
        len(report.sites),
        report.params_before,
        report.params_after,
    )
    return RewriteResult(model, report)


def _stamp(model: onnx.ModelProto, config: RewriteConfig) -> None:
    """Record what produced the model in its metadata (existing entries are kept)."""
    from onnxsvd import __version__

    entries = {
        "onnxsvd.version": __version__,
        "onnxsvd.method": config.method,
        "onnxsvd.policy": config.policy.describe(),
    }
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def rewrite_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    config: RewriteConfig | None = None,
    statistics: Statistics | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> RewriteReport:
    """Load, rewrite, check and save atomically. ``output_path=None`` is a dry run (nothing written).

    Raises:
        ModelError: the input cannot be used.
        OutputError: the output cannot be written (checked before any work).
    """
    input_path = Path(input_path)
    if output_path is not None:
        io.check_output_path(output_path, input_path, force)
    model = io.load_model(input_path)
    result = rewrite(model, config, statistics, base_dir=input_path.parent, progress=progress)
    report = result.report
    report.input = str(input_path)
    report.file_size_before = io.file_size(input_path)
    report.dry_run = output_path is None
    if output_path is not None:
        io.check_model(result.model, full_check=True)
        io.save_model(result.model, output_path)
        report.output = str(output_path)
        report.file_size_after = io.file_size(output_path)
    return report
