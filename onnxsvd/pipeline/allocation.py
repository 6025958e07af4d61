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
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnxsvd.calibrate.collect import session_for
from onnxsvd.config import Progress, RankPolicy, RewriteConfig
from onnxsvd.data import Batches
from onnxsvd.errors import FactorizationError, UsageError
from onnxsvd.factorize import Decomposition, decompose, spectrum, truncate
from onnxsvd.graph import EmitOptions, GraphIndex, Site, emit, load_weight, storage_dtype_for
from onnxsvd.pipeline.group import TargetFn, byte_cost
from onnxsvd.rank import AllocationSite, allocate_budget, allocate_energy, choose_rank, guard_rank

__all__ = ["global_ranks", "measure_sensitivities"]

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
) -> dict[str, float]:
    """``α_s`` per weight group, from truncating each group alone at ``ratios``.

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
    reference = _outputs(model, sample, base_dir)
    sensitivities: dict[str, float] = {}
    for done, (key, sites) in enumerate(groups.items(), start=1):
        site = sites[0]
        ratios_measured = []
        try:
            decomposition = decompose_group(key)
        except FactorizationError:
            decomposition = None
        if decomposition is not None:
            squared = decomposition.s.astype(np.float64) ** 2
            for ratio in ratios:
                decision = choose_rank(RankPolicy("ratio", ratio, align=1), site.k, site.n, None)
                rank = decision.rank if not decision.dense else None
                if not rank or rank >= squared.shape[0]:
                    continue
                discarded = float(squared[rank:].sum())
                if discarded <= 0.0:
                    continue
                storage = storage_dtype_for(site, config.dtype)
                factors = truncate(decomposition, [rank], onnx.helper.tensor_dtype_to_np_dtype(storage))
                trial = copy.deepcopy(model)
                emit(trial, {key: factors}, sites, {key: storage}, EmitOptions(layout="fused"))
                ratios_measured.append(_error(reference, _outputs(trial, sample, base_dir)) / discarded)
        sensitivities[key] = float(np.mean(ratios_measured)) if ratios_measured else float("nan")
        log.debug("sensitivity of %s: %s", site.name, sensitivities[key])
        if progress is not None:
            progress(done, len(groups), site.name)
    # Sites that could not be measured get the median of the others (never 0: that would starve them).
    known = [value for value in sensitivities.values() if np.isfinite(value) and value > 0]
    fallback = float(np.median(known)) if known else 1.0
    return {key: value if np.isfinite(value) and value > 0 else fallback for key, value in sensitivities.items()}


def global_ranks(
    model: onnx.ModelProto,
    groups: OrderedDict[str, list[Site]],
    index: GraphIndex,
    config: RewriteConfig,
    target: TargetFn,
    base_dir: str | None,
    batches: Batches | None,
    progress: Progress | None,
) -> tuple[dict[str, int], list[str]]:
    """Ranks for every group from one budget over all sites (see :mod:`onnxsvd.rank.allocate`)."""
    if config.policy.kind == "rank" or config.stage_ranks is not None:
        raise UsageError("--allocate global takes --ratio (a budget over all sites) or --energy, not a fixed rank")

    fallbacks: list[str] = []

    def decompose_group(key: str) -> Decomposition:
        weight = load_weight(index, groups[key][0], base_dir)
        goal, metric = target(groups[key], weight)
        decomposition = decompose(goal, metric)  # the whole spectrum: [min(K, N)]
        fallbacks.extend(f"{groups[key][0].name}: {note}" for note in decomposition.notes)
        return decomposition

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
    else:
        allocation = allocate_energy(candidates, config.policy.value, align)
    # The byte guard after allocation: a chain no smaller in bytes than its weight as stored (rank 1 of a
    # K = 1 or N = 1 layer, an int8 weight with fp32 factors) stays dense in factor_group, with the reason;
    # its parameters are not spent.
    dense = [
        key for key, rank in allocation.ranks.items()
        if guard_rank("", rank, groups[key][0].k, groups[key][0].n, byte_cost(groups[key][0], config),
                      config.policy.allow_growth).dense
    ]
    unspent = sum(allocation.ranks[key] * (groups[key][0].k + groups[key][0].n) for key in dense)
    spent = allocation.params - unspent
    if config.policy.kind == "ratio":
        note = (
            f"global allocation: {spent:,} of a {allocation.budget:,}-parameter budget "
            f"(ratio {config.policy.value:g} of all sites together); loss estimate {allocation.loss:.4g} "
            f"against {allocation.uniform_loss:.4g} for uniform ranks"
        )
    else:
        note = f"global allocation: energy {config.policy.value:g} over all sites with {spent:,} parameters"
    if dense:
        sites = f"{len(dense)} sites stay dense: their chains" if len(dense) > 1 else "1 site stays dense: its chain"
        note += (
            f"; {sites} at the allocated rank would not be smaller in bytes "
            f"({unspent:,} parameters not counted as spent)"
        )
    if batches is not None:
        note += f"; sensitivities measured at ratios {list(config.sensitivity_ratios)}"
    return dict(allocation.ranks), [note] + [f"sensitivity measurement, {fallback}" for fallback in fallbacks]
