"""Global rank allocation on a model: spectra of every group, measured sensitivities, one budget.

The arithmetic (greedy steps by gain per parameter) is :mod:`onnxsvd.rank.allocate`; this module feeds it
from the model. Sensitivity is how much the model's outputs move when one site alone is truncated (as
ASVD does).

Legend: s a site (weight group), E_s(r) its discarded energy in the method's metric at rank r, Δ_s(r) the
model's normalised output error ``Σ_outputs ‖y − ŷ‖² / ‖y‖²`` on calibration batches with only s
truncated to r. The sensitivity is ``α_s = mean_r Δ_s(r) / E_s(r)`` over a few ratios: the factor that
turns a site's own error into the model's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnxsvd.calibrate.collect import session_for
from onnxsvd.config import Progress, RewriteConfig
from onnxsvd.data import Batches
from onnxsvd.errors import FactorizationError, UsageError
from onnxsvd.factorize import Decomposition, decompose, spectrum, truncate
from onnxsvd.graph import EmitOptions, GraphIndex, Site, emit, load_weight, storage_dtype_for
from onnxsvd.pipeline.group import TargetFn, byte_cost, factor_rounding
from onnxsvd.rank import AllocationSite, allocate_budget, allocate_energy, break_even_rank, guard_rank, ratio_rank

__all__ = ["GlobalPlan", "Sensitivities", "global_ranks", "measure_sensitivities"]

log = logging.getLogger(__name__)


def _outputs(
    model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], base_dir: str | None
) -> list[list[np.ndarray]]:
    session = session_for(model, base_dir=base_dir)
    names = [value.name for value in session.get_outputs()]
    feed_names = {value.name for value in session.get_inputs()}
    return [session.run(names, {k: v for k, v in batch.items() if k in feed_names}) for batch in batches]


def _error(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    total = 0.0
    for ref_batch, cand_batch in zip(reference, candidate, strict=True):
        for ref, cand in zip(ref_batch, cand_batch, strict=True):
            if not np.issubdtype(ref.dtype, np.floating):
                continue
            ref64 = ref.astype(np.float64)
            total += float(np.sum((ref64 - cand.astype(np.float64)) ** 2) / max(np.sum(ref64 * ref64), 1e-30))
    return total / max(len(reference), 1)


@dataclasses.dataclass
class Sensitivities:
    """``α_s`` per weight group, and why each estimated one could not be measured.

    Attributes:
        values: α per group: measured, or the median of the measured ones (1 when none was measured).
        estimated: the groups whose α is estimated, with the reason it could not be measured.
        fallback: the estimate they get: the median of the measured ones (1 when none was measured).
    """

    values: dict[str, float]
    estimated: dict[str, str]
    fallback: float = 1.0


def measure_sensitivities(
    model: onnx.ModelProto,
    groups: Mapping[str, list[Site]],
    decompose_group: Callable[[str], Decomposition],
    config: RewriteConfig,
    batches: Batches,
    ratios: Sequence[float] = (0.25, 0.5),
    max_batches: int = 2,
    base_dir: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Sensitivities:
    """``α_s`` per weight group, from truncating each group alone at ``ratios``.

    A group that cannot be measured (its decomposition fails, no ratio truncates it, it discards no
    energy, or truncating it does not move the outputs) gets the median of the measured ones (never 0:
    that would starve it), and the reason is returned with it.

    Args:
        model: the model the groups were matched in (not modified).
        groups: sites per weight group.
        decompose_group: the full decomposition of a group in the method's metric (one at a time, so
            only one weight's singular vectors are in memory).
        config: the rewrite configuration (storage dtype, layout).
        batches: calibration batches; the first ``max_batches`` are used.
        ratios: the per-layer ratios each site is truncated at.
        max_batches: how many batches to run per measurement.
        base_dir: the model's folder (lazy external data).
        progress: callback per group.
    """
    sample = []
    for batch in batches():
        sample.append(dict(batch))
        if len(sample) >= max_batches:
            break
    if not sample:
        raise UsageError("--allocate global: the calibration data gave no batch to measure sensitivities on")
    reference = _outputs(model, sample, base_dir)
    measured: dict[str, float] = {}
    unmeasured: dict[str, str] = {}
    for done, (key, sites) in enumerate(groups.items(), start=1):
        site = sites[0]
        try:
            value, why = _sensitivity(model, key, sites, decompose_group, config, sample, reference, ratios, base_dir)
        except FactorizationError as error:
            value, why = None, f"its decomposition failed ({error})"
        if value is None:
            unmeasured[key] = why
        else:
            measured[key] = value
        log.debug("sensitivity of %s: %s", site.name, measured.get(key, unmeasured.get(key)))
        if progress is not None:
            progress(done, len(groups), site.name)
    fallback = float(np.median(list(measured.values()))) if measured else 1.0
    values = {key: measured.get(key, fallback) for key in groups}
    return Sensitivities(values, unmeasured, fallback)


def _sensitivity(
    model: onnx.ModelProto,
    key: str,
    sites: list[Site],
    decompose_group: Callable[[str], Decomposition],
    config: RewriteConfig,
    sample: list[dict[str, np.ndarray]],
    reference: list[list[np.ndarray]],
    ratios: Sequence[float],
    base_dir: str | None,
) -> tuple[float | None, str]:
    """``mean_r Δ_s(r) / E_s(r)`` for one group, or ``None`` and why it cannot be measured."""
    site = sites[0]
    decomposition = decompose_group(key)
    squared = decomposition.s.astype(np.float64) ** 2  # [min(K, N)]
    storage = storage_dtype_for(site, config.dtype)
    # The truncation only probes the model: its rank need not pay in bytes, only discard something.
    ranks = sorted({ratio_rank(site.k, site.n, ratio) for ratio in ratios})
    ranks = [rank for rank in ranks if rank < squared.shape[0]]
    if not ranks:
        return None, f"no ratio of {list(ratios)} truncates it (rank ≥ min(K, N) = {squared.shape[0]})"
    values = []
    for rank in ranks:
        discarded = float(squared[rank:].sum())
        if discarded <= 0.0:
            continue
        factors = truncate(decomposition, [rank], *factor_rounding(site, storage))
        trial = copy.deepcopy(model)
        emit(trial, {key: factors}, sites, {key: storage}, EmitOptions(layout="fused"))
        value = _error(reference, _outputs(trial, sample, base_dir)) / discarded
        if np.isfinite(value) and value > 0.0:
            values.append(value)
    if values:
        return float(np.mean(values)), ""
    if all(float(squared[rank:].sum()) <= 0.0 for rank in ranks):
        return None, f"it discards no energy at ranks {ranks} (its weight is of lower rank)"
    return None, f"truncating it alone to ranks {ranks} did not change the outputs measurably"


@dataclasses.dataclass
class GlobalPlan:
    """What global allocation decided for the weight groups.

    Attributes:
        ranks: the allocated rank per group.
        dense: groups kept dense before allocation (outside the budget), with the reason.
        rank_notes: why an allocated rank is not a multiple of ``--align``, per group.
        sensitivities: α per allocated group.
        estimated: groups whose α is estimated, with the reason.
        notes: the report's notes.
    """

    ranks: dict[str, int]
    dense: dict[str, str]
    rank_notes: dict[str, str]
    sensitivities: dict[str, float]
    estimated: dict[str, str]
    notes: list[str]


def global_ranks(
    model: onnx.ModelProto,
    groups: OrderedDict[str, list[Site]],
    index: GraphIndex,
    config: RewriteConfig,
    target: TargetFn,
    base_dir: str | None,
    batches: Batches | None,
    progress: Progress | None,
    kept_dense: Mapping[str, str] | None = None,
) -> GlobalPlan:
    """Ranks for every group from one budget over the sites it allocates (see :mod:`onnxsvd.rank.allocate`).

    Groups in ``kept_dense`` (``--min-share``), groups whose spectrum fails, and groups whose floor is not
    under break-even in bytes stay dense, outside the budget; the budget is ``ρ`` of the others'
    parameters together. Every allocated rank is under break-even in bytes, at or above the floor, and a
    multiple of ``--align`` where one fits.

    Raises:
        UsageError: a fixed rank or stage ranks; no calibration batches (the sensitivities are measured on
            them: a statistics file holds none); a budget too small for the floors (naming the smallest
            feasible ratio).
    """
    if config.policy.kind in ("rank", "full") or config.stage_ranks is not None:
        raise UsageError("--allocate global takes --ratio (a budget over all sites) or --energy, not a fixed rank")
    if batches is None:
        raise UsageError(
            "--allocate global measures each site's sensitivity by running calibration batches, which a "
            "statistics file does not hold: pass --data DATA (not --stats)"
        )
    dense = dict(kept_dense or {})

    fallbacks: list[str] = []

    def decompose_group(key: str) -> Decomposition:
        weight = load_weight(index, groups[key][0], base_dir)
        goal, metric = target(groups[key], weight)
        decomposition = decompose(goal, metric)  # the whole spectrum: [min(K, N)]
        fallbacks.extend(f"{groups[key][0].name}: {note}" for note in decomposition.notes)
        return decomposition

    floor = config.policy.floor
    spectra: dict[str, np.ndarray] = {}
    limits: dict[str, int] = {}
    for key, sites in groups.items():
        if key in dense:
            continue
        site = sites[0]
        cost = byte_cost(site, config)
        full = min(site.k, site.n)
        limit = full if config.policy.allow_growth else min(full, break_even_rank(site.k, site.n, cost) - 1)
        if limit < 1:
            dense[key] = guard_rank("global allocation", 1, site.k, site.n, cost, False).reason
            continue
        if floor > limit:
            dense[key] = (
                f"global allocation: the largest rank under break-even is {limit} (bytes: {cost.label}), below "
                f"--min-rank {floor}: kept dense, outside the budget"
            )
            continue
        limits[key] = limit
    if config.policy.kind == "ratio" and limits:
        # Refuse a budget too small for the floors before any SVD or sensitivity run (the spectra do not
        # change what the lowest ranks cost).
        shapes = [
            AllocationSite(key, groups[key][0].k, groups[key][0].n, np.zeros(1), min_rank=floor, rank_limit=limit)
            for key, limit in limits.items()
        ]
        allocate_budget(shapes, config.policy.value, config.policy.align)
    for key in list(limits):
        try:
            weight = load_weight(index, groups[key][0], base_dir)
            goal, metric = target(groups[key], weight)
            spectra[key] = spectrum(goal, metric)  # only the singular values are kept: [min(K, N)]
        except FactorizationError as error:
            dense[key] = str(error)
            del limits[key]
    if not spectra:
        return GlobalPlan({}, dense, {}, {}, {}, [])
    measured = measure_sensitivities(
        model, {k: groups[k] for k in spectra}, decompose_group, config, batches,
        ratios=config.sensitivity_ratios, base_dir=base_dir, progress=progress,
    )
    candidates = [
        AllocationSite(key, groups[key][0].k, groups[key][0].n, spectra[key], measured.values[key],
                       min_rank=floor, rank_limit=limits[key])
        for key in spectra
    ]
    align = config.policy.align
    if config.policy.kind == "ratio":
        allocation = allocate_budget(candidates, config.policy.value, align)
        note = (
            f"global allocation: {allocation.params:,} of a {allocation.budget:,}-parameter budget "
            f"(ratio {config.policy.value:g} of the {len(candidates)} allocated sites' parameters together); "
            f"loss estimate {allocation.loss:.4g} against {allocation.uniform_loss:.4g} for uniform ranks"
        )
    else:
        allocation = allocate_energy(candidates, config.policy.value, align)
        note = (
            f"global allocation: energy {config.policy.value:g} over the {len(candidates)} allocated sites "
            f"with {allocation.params:,} parameters"
        )
    note += f"; ranks at least --min-rank {floor}, multiples of --align {align} where one fits under break-even"
    if dense:
        note += f"; {len(dense)} kept dense outside the budget (each site's reason)"
    note += f"; sensitivities measured at ratios {list(config.sensitivity_ratios)}"
    notes = [note]
    if measured.estimated:
        listed = "; ".join(f"{groups[k][0].name}: {why}" for k, why in measured.estimated.items())
        notes.append(
            f"estimated sensitivities: {len(measured.estimated)} of {len(spectra)} sites could not be measured and "
            f"count with the median of the others ({measured.fallback:.4g}): {listed}"
        )
    return GlobalPlan(
        ranks=dict(allocation.ranks),
        dense=dense,
        rank_notes=dict(allocation.notes),
        sensitivities={k: measured.values[k] for k in spectra},
        estimated=dict(measured.estimated),
        notes=notes + [f"sensitivity measurement, {fallback}" for fallback in fallbacks],
    )
