"""The rewrite pass: match → plan ranks → factorize → emit, with a report of every site.

``rewrite(model, config)`` works on a ``ModelProto`` in memory and never mutates its argument;
``rewrite_file`` adds loading, output checks, atomic saving and file sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate import CalibrateConfig
from onnxsvd.calibrate.stats import ActivationStats, Statistics, combine
from onnxsvd.config import RewriteConfig
from onnxsvd.errors import FactorizationError, StatsError, UsageError
from onnxsvd.factorize import (
    Decomposition,
    Factorization,
    Metric,
    SvdOptions,
    decompose,
    diagonal_metric,
    identity_metric,
    spectrum,
    split_rank,
    truncate,
    whitening_metric,
)
from onnxsvd.graph import (
    EmitOptions,
    FactorTensors,
    GraphIndex,
    Match,
    Site,
    emit,
    find_sites,
    load_weight,
    storage_dtype_for,
)
from onnxsvd.rank import choose_rank
from onnxsvd.report import RewriteReport, SiteReport

if TYPE_CHECKING:  # the speed check lives in onnxsvd.validate, imported lazily
    from onnxsvd.validate.site_speed import SpeedCheckConfig

__all__ = [
    "GroupOutcome",
    "RewriteResult",
    "SpeedCheck",
    "assemble",
    "factor_group",
    "metric_for",
    "rewrite",
    "rewrite_file",
    "weight_groups",
]

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
    parts = [statistics.activations.get(site.statistics_key) for site in sites]
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


#: Turns a group's dense weight ``[K, N]`` into ``(target [K, N], metric)`` to decompose; the default
#: is ``(W, metric of the method)``. The sequential rewrite substitutes its least-squares target.
TargetFn = Callable[[list[Site], np.ndarray], "tuple[np.ndarray, Metric]"]

#: Optionally replaces the factors chosen for a group (the sequential rewrite refits ``B`` here).
RefitFn = Callable[[list[Site], np.ndarray, Factorization], Factorization]


@dataclasses.dataclass
class GroupOutcome:
    """What happened to one weight group (sites that share one normalised weight)."""

    sites: list[Site]
    factorization: Factorization | None
    reason: str
    ranks: list[int]
    storage: int
    kept_energy: float | None = None
    weight_error: float | None = None
    seconds: float = 0.0
    dense_ms: float | None = None
    factorized_ms: float | None = None
    speedup: float | None = None
    speed_provider: str | None = None
    rank: int = 0
    prepared: bool = False

    @property
    def factorized(self) -> bool:
        """True when the group is replaced by factors (held here, or already made into initializers)."""
        return self.factorization is not None or self.prepared


#: Decides, after the factors are chosen and before they are emitted, which groups stay dense: called as
#: ``check(model, outcomes, base_dir)`` with the model the sites were matched in, it drops the factors of
#: the outcomes to keep dense (with their reason) and returns the list. See
#: :class:`onnxsvd.validate.site_speed.SiteSpeedCheck` (``--keep-dense-if-slower``).
SpeedCheck = Callable[[onnx.ModelProto, "list[GroupOutcome]", "str | None"], "list[GroupOutcome]"]


def _choose_ranks(
    site: Site, config: RewriteConfig, decomposition: Decomposition, rank_override: int | None = None
) -> tuple[list[int] | None, str]:
    """Stage ranks for a decomposed weight, or ``None`` and the reason it stays dense."""
    if rank_override is not None:
        return _stage_ranks(config, rank_override), f"global allocation: rank {rank_override}"
    if config.stage_ranks is not None:
        ranks = list(config.stage_ranks)
        total = sum(ranks)
        limit = min(site.k, site.n)
        if total > limit:
            return None, f"--stage-ranks sum {total} exceeds min(K, N) = {limit}"
        if total * (site.k + site.n) >= site.params and not config.policy.allow_growth:
            return None, f"--stage-ranks sum {total} ≥ break-even (r·(K+N) ≥ K·N); use --allow-growth to force"
        return ranks, f"stage ranks {','.join(map(str, ranks))}"
    decision = choose_rank(config.policy, site.k, site.n, decomposition.s)
    if decision.dense:
        return None, decision.reason
    return _stage_ranks(config, decision.rank), decision.reason


def svd_options(config: RewriteConfig) -> SvdOptions:
    """How the SVDs of a rewrite are computed (solver, backend, device)."""
    return SvdOptions(solver=config.svd, backend="torch" if config.device != "cpu" else "auto", device=config.device)


def _planned_rank(site: Site, config: RewriteConfig, rank_override: int | None = None) -> tuple[int | None, str]:
    """The total rank when the policy fixes it from the shape alone (rank, ratio, stage ranks), so a
    randomized SVD can compute only what is kept; and the reason to stay dense if the shape decides it."""
    if rank_override is not None:
        return rank_override, ""
    if config.stage_ranks is not None:
        return min(sum(config.stage_ranks), min(site.k, site.n)), ""
    if config.policy.kind == "energy":
        return None, ""
    decision = choose_rank(config.policy, site.k, site.n, None)
    return (None, decision.reason) if decision.dense else (decision.rank, "")


def factor_group(
    index: GraphIndex,
    sites: list[Site],
    config: RewriteConfig,
    target: TargetFn,
    base_dir: str | None = None,
    refit: RefitFn | None = None,
    rank_override: int | None = None,
) -> GroupOutcome:
    """Load a group's weight, decompose ``target`` in its metric, choose ranks, truncate, measure.

    A failure of any step keeps the group dense with the reason; nothing is swapped silently.
    """
    site = sites[0]
    tick = time.perf_counter()
    storage = storage_dtype_for(site, config.dtype)
    outcome = GroupOutcome(sites=sites, factorization=None, reason="", ranks=[], storage=storage)
    try:
        planned, dense_reason = _planned_rank(site, config, rank_override)
        if dense_reason:  # decided from the shape alone: no need to read or decompose the weight
            outcome.reason = dense_reason
            outcome.seconds = time.perf_counter() - tick
            return outcome
        weight = load_weight(index, site, base_dir)  # [K, N]
        if not np.all(np.isfinite(weight)):
            raise FactorizationError("weight contains NaN or Inf")
        goal, metric = target(sites, weight)  # [K, N], Lᵀ
        decomposition = decompose(goal, metric, rank=planned, options=svd_options(config))
        ranks, reason = _choose_ranks(site, config, decomposition, rank_override)
        outcome.reason = reason
        if ranks is not None:
            factorization = truncate(decomposition, ranks, onnx.helper.tensor_dtype_to_np_dtype(storage))
            if refit is not None:
                factorization = refit(sites, weight, factorization)
            norm = float(np.linalg.norm(weight))
            error = float(np.linalg.norm(weight - factorization.product())) / norm if norm > 0 else 0.0
            if not np.isfinite(error):
                outcome.reason = "factors overflow the storage dtype (NaN/Inf)"
            else:
                outcome.factorization, outcome.ranks = factorization, ranks
                outcome.rank = factorization.rank
                outcome.kept_energy, outcome.weight_error = factorization.kept_energy, error
    except FactorizationError as error:
        outcome.reason = str(error)
    outcome.seconds = time.perf_counter() - tick
    log.debug("%s: %s", site.name, outcome.reason)
    return outcome


def _site_reports(outcome: GroupOutcome) -> list[SiteReport]:
    names = [s.name for s in outcome.sites]
    reports = []
    for member in outcome.sites:
        factorized = outcome.factorized
        rank = outcome.rank if factorized else 0
        reports.append(
            SiteReport(
                name=member.name,
                op_type=member.op_type,
                shape=[member.k, member.n],
                action="factorized" if factorized else "kept",
                reason=outcome.reason,
                rank=rank,
                stage_ranks=outcome.ranks,
                params_before=member.params,
                params_after=rank * (member.k + member.n) if factorized else member.params,
                kept_energy=outcome.kept_energy,
                weight_error=outcome.weight_error,
                shared_with=[n for n in names if n != member.name],
                seconds=outcome.seconds,
                dense_ms=outcome.dense_ms,
                factorized_ms=outcome.factorized_ms,
                speedup=outcome.speedup,
                speed_provider=outcome.speed_provider,
            )
        )
    return reports


def emit_outcomes(
    model: onnx.ModelProto,
    outcomes: list[GroupOutcome],
    config: RewriteConfig,
    tensors: FactorTensors | None = None,
) -> onnx.ModelProto:
    """Emit every factorized group into ``model`` (mutated; node indices must be those matched).

    ``tensors`` holds the initializers of groups already prepared (their arrays dropped).
    """
    factorized = [o for o in outcomes if o.factorized]
    if not factorized:
        return model
    emit(
        model,
        {o.sites[0].group: o.factorization for o in factorized if o.factorization is not None},
        [site for o in factorized for site in o.sites],
        {o.sites[0].group: o.storage for o in factorized},
        EmitOptions(layout=config.layout),
        tensors,
    )
    _stamp(model, config)
    return model


def assemble(
    model: onnx.ModelProto,
    match: Match,
    outcomes: list[GroupOutcome],
    config: RewriteConfig,
    params_before: int,
    started: float,
    tensors: FactorTensors | None = None,
) -> RewriteResult:
    """Emit the factorized groups into ``model`` (a private copy) and build the report."""
    reports: dict[int, SiteReport] = {}
    for outcome in outcomes:
        for site, report in zip(outcome.sites, _site_reports(outcome), strict=True):
            reports[site.node_index] = report
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
    emit_outcomes(model, outcomes, config, tensors)
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


def weight_groups(sites: Sequence[Site]) -> OrderedDict[str, list[Site]]:
    """Sites grouped by the normalised weight they share, in graph order."""
    groups: OrderedDict[str, list[Site]] = OrderedDict()
    for site in sites:
        groups.setdefault(site.group, []).append(site)
    return groups


def rewrite(
    model: onnx.ModelProto,
    config: RewriteConfig | None = None,
    statistics: Statistics | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    speed_check: SpeedCheck | None = None,
    batches: Callable[[], Any] | None = None,
    data_file: io.DataFile | None = None,
) -> RewriteResult:
    """Replace every eligible MatMul/Gemm of ``model`` by a low-rank factor chain.

    Args:
        model: the model; not modified.
        config: policy, method, layout (defaults: plain SVD, ratio 0.5, fused).
        statistics: calibration statistics of this model (required by ``asvd`` and ``whiten``).
        base_dir: folder of the model file, for external data.
        progress: optional callback after each weight.
        speed_check: applied to the factorized groups before they are emitted (keeps dense the groups
            whose chain is not faster; see :class:`onnxsvd.validate.site_speed.SiteSpeedCheck`).
        batches: calibration batches (a callable giving a fresh iterable), used by ``allocate="global"``
            to measure each site's sensitivity; without them every site counts with sensitivity 1.
        data_file: the output's :class:`onnxsvd.io.DataFile`: each factor is written there as soon as it is
            made (the returned model's factor initializers point at it), so no factor stays in memory;
            save the model with ``io.save_model(..., data_file=data_file)``. Not with ``speed_check``.

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
    groups = weight_groups(match.sites)

    def target(sites: list[Site], weight: np.ndarray) -> tuple[np.ndarray, Metric]:
        return weight, metric_for(config, _group_statistics(sites, statistics))

    base = str(base_dir) if base_dir is not None else None
    # Without a speed check nothing needs the arrays after a group is done: its factors become
    # initializers at once and the arrays are dropped, so at most `jobs` weights are in memory.
    if data_file is not None and speed_check is not None:
        raise UsageError("a speed check needs the factors in memory: do not stream them to a data file")
    tensors = FactorTensors(model, data_file) if speed_check is None else None

    overrides: dict[str, int] = {}
    notes: list[str] = []
    if config.allocate == "global":
        overrides, notes = _global_ranks(model, groups, index, config, target, base, batches, progress)

    def work(sites: list[Site]) -> GroupOutcome:
        return factor_group(index, sites, config, target, base, rank_override=overrides.get(sites[0].group))

    outcomes: list[GroupOutcome] = []
    jobs = config.jobs or max(1, min(4, (os.cpu_count() or 1) // 2))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        # LAPACK/torch release the GIL; the map keeps graph order and at most `jobs` weights in flight.
        for done, outcome in enumerate(_bounded_map(pool, work, list(groups.values()), jobs), start=1):
            if tensors is not None and outcome.factorization is not None:
                tensors.prepare(outcome.sites, outcome.factorization, outcome.storage, config.layout)
                outcome.factorization, outcome.prepared = None, True
            outcomes.append(outcome)
            if progress is not None:
                progress(done, len(groups), outcome.sites[0].name)
    if speed_check is not None:
        outcomes = speed_check(model, outcomes, base)
    result = assemble(model, match, outcomes, config, params_before, started, tensors)
    result.report.notes.extend(notes)
    return result


def _global_ranks(
    model: onnx.ModelProto,
    groups: OrderedDict[str, list[Site]],
    index: GraphIndex,
    config: RewriteConfig,
    target: TargetFn,
    base_dir: str | None,
    batches: Callable[[], Any] | None,
    progress: Progress | None,
) -> tuple[dict[str, int], list[str]]:
    """Ranks for every group from one budget over all sites (see :mod:`onnxsvd.allocate`)."""
    from onnxsvd.allocate import AllocationSite, allocate_budget, allocate_energy

    if config.policy.kind == "rank" or config.stage_ranks is not None:
        raise UsageError("--allocate global takes --ratio (a budget over all sites) or --energy, not a fixed rank")
    def decompose_group(key: str) -> Decomposition:
        weight = load_weight(index, groups[key][0], base_dir)
        goal, metric = target(groups[key], weight)
        return decompose(goal, metric)  # the whole spectrum: [min(K, N)]

    spectra: dict[str, np.ndarray] = {}
    for key, sites in groups.items():
        try:
            weight = load_weight(index, sites[0], base_dir)
            goal, metric = target(sites, weight)
            spectra[key] = spectrum(goal, metric)  # only the singular values are kept: [min(K, N)]
        except FactorizationError:
            continue  # factor_group will keep it dense with the reason
    sensitivities = dict.fromkeys(spectra, 1.0)
    if batches is not None:
        from onnxsvd.sensitivity import measure_sensitivities

        sensitivities = measure_sensitivities(
            model, {k: groups[k] for k in spectra}, decompose_group, config, batches,
            ratios=config.sensitivity_ratios, base_dir=base_dir, progress=progress,
        )
    candidates = [
        AllocationSite(key, groups[key][0].k, groups[key][0].n, spectra[key], sensitivities[key]) for key in spectra
    ]
    if not candidates:
        return {}, []
    align = config.policy.align
    if config.policy.kind == "ratio":
        allocation = allocate_budget(candidates, config.policy.value, align)
        note = (
            f"global allocation: {allocation.params:,} of a {allocation.budget:,}-parameter budget "
            f"(ratio {config.policy.value:g} of all sites together); loss estimate {allocation.loss:.4g} "
            f"against {allocation.uniform_loss:.4g} for uniform ranks"
        )
    else:
        allocation = allocate_energy(candidates, config.policy.value, align)
        note = f"global allocation: energy {config.policy.value:g} over all sites with {allocation.params:,} parameters"
    if batches is not None:
        note += f"; sensitivities measured at ratios {list(config.sensitivity_ratios)}"
    return dict(allocation.ranks), [note]


def _bounded_map(pool: concurrent.futures.Executor, function: Callable, items: list, window: int):
    """``pool.map`` that submits at most ``window`` items ahead of the one being yielded."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
    data: str | os.PathLike[str] | None = None,
    calibration: CalibrateConfig | None = None,
    sequential: bool = False,
    external_data: bool | None = None,
    speed_check: SpeedCheckConfig | None = None,
) -> RewriteReport:
    """Load, rewrite, check and save atomically. ``output_path=None`` is a dry run (nothing written).

    Args:
        input_path: the model.
        output_path: where to write, or None for a dry run.
        config: the rewrite configuration.
        statistics: calibration statistics (or pass ``data`` to calibrate here).
        force: allow ``output_path`` to be the input.
        progress: callback per weight (or per level with ``sequential``).
        data: calibration data (``.npz`` or folder), checked against the model before any work.
        calibration: how to read and run the data.
        sequential: fit each level to the partly compressed model's inputs (needs ``data``).
        external_data: write the weights to ``<output>.data`` (default: when the input keeps its weights
            in external data too, or the output would reach 2 GB).
        speed_check: time each factorized site dense against factorized on the configured providers and
            keep dense those whose chain is not faster (``--keep-dense-if-slower``); the activation shapes
            come from ``speed_check.input_shapes``, else from the first batch of ``data``.

    Raises:
        ModelError: the input cannot be used.
        OutputError: the output cannot be written (checked before any work).
        DataError: the data does not fit the model.
    """
    config = config or RewriteConfig()
    calibration = calibration or CalibrateConfig()
    input_path = Path(input_path)
    if output_path is not None:
        io.check_output_path(output_path, input_path, force)
    if sequential and data is None:
        raise UsageError("--sequential needs calibration data: pass --data DATA")
    if speed_check is not None:
        from onnxsvd.validate.site_speed import SHAPE_HINT, check_providers

        if data is None and not speed_check.input_shapes:
            raise UsageError(SHAPE_HINT)
        check_providers(speed_check.providers)
    model = io.load_model(input_path)
    if output_path is not None and external_data is None:
        external_data = io.is_lazy(model) or any(True for _ in io.external_tensors(io_probe(input_path)))
    # Writing external data, the factors go straight to the output's data file as they are made (not
    # with a speed check or the sequential rewrite, which run the partly rewritten model).
    stream = output_path is not None and external_data and not sequential and speed_check is None
    with io.DataFile(output_path) if stream else contextlib.nullcontext() as data_file:
        rewritten = _rewrite_loaded(
            model, input_path, config, statistics, progress, data, calibration, sequential, speed_check, data_file
        )
        if output_path is not None:
            if not external_data and not io.is_lazy(rewritten.model):
                io.check_model(rewritten.model, full_check=True)
            io.save_model(
                rewritten.model, output_path, base_dir=input_path.parent, external_data=external_data,
                data_file=data_file,
            )
    report = rewritten.report
    report.input = str(input_path)
    report.file_size_before = io.file_size(input_path)
    report.dry_run = output_path is None
    if output_path is not None:
        if external_data:
            _check_written(Path(output_path))
        report.output = str(output_path)
        report.file_size_after = io.file_size(output_path)
    return report


def _rewrite_loaded(
    model: onnx.ModelProto,
    input_path: Path,
    config: RewriteConfig,
    statistics: Statistics | None,
    progress: Progress | None,
    data: str | os.PathLike[str] | None,
    calibration: CalibrateConfig,
    sequential: bool,
    speed_check: SpeedCheckConfig | None,
    data_file: io.DataFile | None,
) -> RewriteResult:
    """The rewrite step of :func:`rewrite_file`: calibrate if asked, then one-shot or sequential."""
    from onnxsvd.calibrate import batch_source, calibrate, calibrate_to_file, resolve_mask

    check = _site_speed_check(speed_check, model, data, calibration, config, progress)
    if sequential:
        from onnxsvd.sequential import rewrite_sequential

        batches, _ = batch_source(data, model, calibration)  # type: ignore[arg-type]
        return rewrite_sequential(
            model,
            config,
            batches,
            providers=calibration.providers,
            mask_input=resolve_mask(model, calibration),
            base_dir=str(input_path.parent),
            progress=progress,
            speed_check=check,
        )
    calibrate_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="onnxsvd-stats-") as scratch:
        if data is not None and config.needs_statistics:
            tick = time.perf_counter()
            batches, count = batch_source(data, model, calibration)
            if io.is_lazy(model):
                # A model too big to load: its statistics go to a file and are read one Gram at a time.
                statistics = calibrate_to_file(
                    model, batches, Path(scratch) / "stats.npz", calibration, total_batches=count,
                    base_dir=input_path.parent,
                )
            else:
                statistics = calibrate(model, batches, calibration, total_batches=count, base_dir=input_path.parent)
            calibrate_seconds = time.perf_counter() - tick
        allocation_batches = None
        if data is not None and config.allocate == "global":
            allocation_batches, _ = batch_source(data, model, calibration)
        result = rewrite(
            model,
            config,
            statistics,
            base_dir=input_path.parent,
            progress=progress,
            speed_check=check,
            batches=allocation_batches,
            data_file=data_file,
        )
    if calibrate_seconds:
        result.report.notes.append(f"calibration: {calibrate_seconds:.1f} s")
    return result


def _site_speed_check(
    speed_check: SpeedCheckConfig | None,
    model: onnx.ModelProto,
    data: str | os.PathLike[str] | None,
    calibration: CalibrateConfig,
    config: RewriteConfig,
    progress: Progress | None,
) -> SpeedCheck | None:
    """The ``--keep-dense-if-slower`` check, with the first calibration batch when no shapes are declared."""
    if speed_check is None:
        return None
    from onnxsvd.calibrate import batch_source
    from onnxsvd.validate.site_speed import SiteSpeedCheck

    batch = None
    if not speed_check.input_shapes and data is not None:
        batches, _ = batch_source(data, model, calibration)
        batch = next(iter(batches()), None)
    return SiteSpeedCheck(speed_check, batch=batch, layout=config.layout, progress=progress)


def io_probe(path: Path) -> onnx.ModelProto:
    """The model's graph without its external data (cheap), to see how the input stores its weights."""
    return onnx.load(str(path), load_external_data=False)


def _check_written(output: Path) -> None:
    """Check a model written with external data by path (full check includes shape inference); remove it
    if it fails."""
    try:
        onnx.checker.check_model(str(output), full_check=True)  # by path: external data and > 2 GB work
    except Exception:
        for leftover in (output, output.parent / f"{output.name}.data"):
            leftover.unlink(missing_ok=True)
        raise
