"""Per-weight-group work: load a weight, decompose it in its data metric, choose ranks, truncate, measure.

A *group* is the sites that consume one normalised weight (factorized once, factors shared). Every pass
(one-shot, sequential, global allocation) runs :func:`factor_group` on each group with its own target:
the one-shot pass decomposes ``W`` itself, the sequential pass its least-squares target.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate.stats import ActivationStats, Statistics, combine
from onnxsvd.config import RewriteConfig
from onnxsvd.errors import FactorizationError, StatsError
from onnxsvd.factorize import (
    Decomposition,
    Factorization,
    Metric,
    SvdOptions,
    decompose,
    diagonal_metric,
    identity_metric,
    split_rank,
    truncate,
    whitening_metric,
)
from onnxsvd.graph import GraphIndex, Site, conv_flops, dtype_name, load_weight, storage_dtype_for
from onnxsvd.rank import ByteCost, choose_rank, guard_rank

__all__ = [
    "GroupOutcome",
    "RefitFn",
    "SpeedCheck",
    "TargetFn",
    "byte_cost",
    "factor_group",
    "aligned_sites",
    "group_statistics",
    "metric_for",
    "orientation_note",
    "share_floor",
    "sampling_notes",
    "conv_notes",
    "SPATIAL_DATA_FREE",
    "svd_options",
    "weight_groups",
]


log = logging.getLogger(__name__)


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


#: What the report says of a spatial-form Conv site under an activation-aware method.
SPATIAL_DATA_FREE = (
    "spatial form: factorized data-free (plain SVD); the patch statistics measure the channel form's matrix, "
    "not the spatial one"
)


def conv_notes(site: Site, config: RewriteConfig) -> list[str]:
    """A Conv site's notes: why its form is not the one asked for, and a spatial form's data-free metric."""
    if site.conv is None:
        return []
    notes = [site.conv.note] if site.conv.note else []
    if site.conv.form == "spatial" and config.method != "svd":
        notes.append(SPATIAL_DATA_FREE)
    return notes


def sampling_notes(sites: list[Site], statistics: Statistics | None, config: RewriteConfig) -> list[str]:
    """A note for each Conv input of a group whose patch Gram is from a sample of its positions."""
    if statistics is None or config.method == "svd" or sites[0].conv is None or sites[0].conv.form != "channel":
        return []
    notes = []
    for key in dict.fromkeys(site.statistics_key for site in aligned_sites(sites)):
        stats = statistics.activations.get(key)
        if stats is not None and stats.sampled:
            notes.append(
                f"patch statistics of {key.split('#')[0]!r} from {stats.rows:,} of {stats.positions:,} positions "
                "(sampled with a seed; 'calibrate --patch-rows' keeps more)"
            )
    return notes


def _data_free(sites: list[Site], weight: np.ndarray) -> tuple[np.ndarray, Metric]:
    return weight, identity_metric()


def _flops_reason(site: Site, rank: int) -> str:
    """Why a Conv chain at ``rank`` stays dense on multiply-adds per output position, else empty."""
    if site.conv is None:
        return ""
    dense, factored = conv_flops(site.conv, None), conv_flops(site.conv, rank)
    if factored < dense:
        return ""
    return (
        f"{site.conv.form} form at rank {rank}: {factored:,.0f} multiply-adds per output position, not under the "
        f"dense Conv's {dense:,.0f}: kept dense"
    )


def aligned_sites(sites: list[Site]) -> list[Site]:
    """The sites of a group that read its weight as the first site does (``W_kn``, not ``W_knᵀ``).

    A group is factorized in its first site's orientation; only these sites' activations are in that
    orientation's input space, so only their statistics make its metric.
    """
    return [site for site in sites if site.kn_transposed == sites[0].kn_transposed]


def group_statistics(sites: list[Site], statistics: Statistics | None) -> ActivationStats | None:
    """The statistics of a group's metric: its uses' inputs stacked, ``G = Σ_u X_uᵀX_u`` over the distinct
    activations of the sites in the first site's orientation (:func:`aligned_sites`), so that
    ``Σ_u ‖X_u (W − W')‖² = ‖Lᵀ (W − W')‖²``. Two sites reading one activation count it once."""
    if statistics is None:
        return None
    aligned = aligned_sites(sites)
    keys = list(dict.fromkeys(site.statistics_key for site in aligned))
    parts = [statistics.activations.get(key) for key in keys]
    if any(part is None for part in parts):
        return None
    parts = [p for p in parts if p is not None]
    if any(p.channels != sites[0].k for p in parts):
        raise StatsError(
            f"statistics for {sites[0].activation!r} have {parts[0].channels} channels, the layer has "
            f"{sites[0].k}; re-run 'onnxsvd calibrate' on this model"
        )
    return combine(parts)


def orientation_note(sites: list[Site], config: RewriteConfig) -> str:
    """For an activation-aware group whose sites read the weight both ways round: which uses make the
    metric (the others' inputs live in the other space), else empty."""
    aligned = aligned_sites(sites)
    if config.method == "svd" or len(aligned) == len(sites):
        return ""
    others = len(sites) - len(aligned)
    return (
        f"metric from the {len(aligned)} use(s) reading the weight as [{sites[0].k}, {sites[0].n}]; "
        f"the {others} use(s) reading it transposed share the factors without their statistics"
    )


def _stage_ranks(config: RewriteConfig, total: int) -> list[int]:
    """The stages' ranks: an even split, in multiples of ``--align`` when the total is one and has enough
    of them (24 over 2 stages at align 8: 16+8, not 12+12)."""
    stages = min(config.stages, total)
    align = config.policy.align
    if stages > 1 and align > 1 and total % align == 0 and total // align >= stages:
        return [units * align for units in split_rank(total // align, stages)]
    return split_rank(total, stages)


def share_floor(groups: OrderedDict[str, list[Site]], config: RewriteConfig) -> dict[str, str]:
    """The weight groups ``--min-share`` keeps dense, with the reason: those with less than
    ``config.min_share`` of the largest group's parameters (none with ``--rank full``).

    The share is of the largest site, not of all sites together: in a 12-layer transformer each 768×768
    projection holds 0.7% of all sites' parameters, and in a 32-layer decoder every site holds well under
    1%, so a share of the total would keep whole models dense.
    """
    if config.min_share <= 0.0 or config.policy.kind == "full" or not groups:
        return {}
    params = {key: sites[0].k * sites[0].n for key, sites in groups.items()}
    largest = max(params.values())
    reasons = {}
    for key, count in params.items():
        if count < config.min_share * largest:
            reasons[key] = (
                f"{count:,} parameters, {count / largest:.2%} of the largest site's {largest:,} < --min-share "
                f"{config.min_share:g}: kept dense (--min-share 0 factorizes it)"
            )
    return reasons


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
    notes: list[str] = dataclasses.field(default_factory=list)
    rank_note: str = ""
    sensitivity: float | None = None
    sensitivity_estimated: str | None = None

    @property
    def factorized(self) -> bool:
        """True when the group is replaced by factors (held here, or already made into initializers)."""
        return self.factorization is not None or self.prepared


#: Decides, after the factors are chosen and before they are emitted, which groups stay dense: called as


#: ``check(model, outcomes, base_dir)`` with the model the sites were matched in, it drops the factors of


#: the outcomes to keep dense (with their reason) and returns the list. See


#: :class:`onnxsvd.pipeline.speed.SiteSpeedCheck` (``--keep-dense-if-slower``).


SpeedCheck = Callable[[onnx.ModelProto, "list[GroupOutcome]", "str | None"], "list[GroupOutcome]"]


def byte_cost(site: Site, config: RewriteConfig) -> ByteCost:
    """The site's weight in bytes as stored, and the bytes of one of its factor values in the factor
    dtype (``--dtype``): what the break-even guard compares."""
    storage = storage_dtype_for(site, config.dtype)
    label = f"{dtype_name(site.weight.storage_dtype)} weight, {dtype_name(storage)} factors"
    return ByteCost(site.dense_bytes, io.dtype_bytes(storage, 1), label)


def _fixed_ranks(
    site: Site, config: RewriteConfig, rank_override: int | None
) -> tuple[list[int] | None, str] | None:
    """Stage ranks fixed before any SVD (a global allocation, ``--stage-ranks``), or ``None`` and the
    reason the weight stays dense; ``None`` alone when the policy needs the spectrum or the shape."""
    cost = byte_cost(site, config)
    if rank_override is not None:
        decision = guard_rank(
            f"global allocation: rank {rank_override}", rank_override, site.k, site.n, cost,
            config.policy.allow_growth,
        )
        return (None if decision.dense else _stage_ranks(config, rank_override)), decision.reason
    if config.stage_ranks is not None:
        ranks = list(config.stage_ranks)
        total = sum(ranks)
        limit = min(site.k, site.n)
        if total > limit:
            return None, f"--stage-ranks sum {total} exceeds min(K, N) = {limit}"
        how = f"--stage-ranks {','.join(map(str, ranks))}"
        decision = guard_rank(how, total, site.k, site.n, cost, config.policy.allow_growth)
        if decision.dense:
            return None, decision.reason
        return ranks, f"stage ranks {','.join(map(str, ranks))}"
    return None


def _choose_ranks(
    site: Site, config: RewriteConfig, decomposition: Decomposition, rank_override: int | None = None
) -> tuple[list[int] | None, str, str]:
    """Stage ranks for a decomposed weight, or ``None`` and the reason it stays dense; and the note on
    how the policy's rank was rounded (``""`` for a fixed or allocated rank)."""
    fixed = _fixed_ranks(site, config, rank_override)
    if fixed is not None:
        return (*fixed, "")
    decision = choose_rank(config.policy, site.k, site.n, decomposition.s, byte_cost(site, config))
    if decision.dense:
        return None, decision.reason, decision.note
    return _stage_ranks(config, decision.rank), decision.reason, decision.note


def svd_options(config: RewriteConfig) -> SvdOptions:
    """How the SVDs of a rewrite are computed (solver, backend, device)."""
    return SvdOptions(solver=config.svd, backend="torch" if config.device != "cpu" else "auto", device=config.device)


def _planned_rank(site: Site, config: RewriteConfig, rank_override: int | None = None) -> tuple[int | None, str]:
    """The total rank when the policy fixes it from the shape alone (rank, ratio, stage ranks), so a
    randomized SVD can compute only what is kept; and the reason to stay dense if the shape decides it."""
    fixed = _fixed_ranks(site, config, rank_override)
    if fixed is not None:
        ranks, reason = fixed
        return (None, reason) if ranks is None else (sum(ranks), "")
    if config.policy.kind == "energy":
        return None, ""
    decision = choose_rank(config.policy, site.k, site.n, None, byte_cost(site, config))
    return (None, decision.reason) if decision.dense else (decision.rank, "")


def factor_group(
    index: GraphIndex,
    sites: list[Site],
    config: RewriteConfig,
    target: TargetFn,
    base_dir: str | None = None,
    refit: RefitFn | None = None,
    rank_override: int | None = None,
    keep_dense: str | None = None,
) -> GroupOutcome:
    """Load a group's weight, decompose ``target`` in its metric, choose ranks, truncate, measure.

    A failure of any step keeps the group dense with the reason; nothing is swapped silently.
    ``keep_dense`` is a reason decided before (``--min-share``, global allocation): the weight is not read.
    """
    site = sites[0]
    tick = time.perf_counter()
    storage = storage_dtype_for(site, config.dtype)
    if site.conv is not None and site.conv.form == "spatial":
        # The statistics are of the channel form's patches; the spatial matrix is factorized data-free.
        target, refit = _data_free, None
    extra_notes = conv_notes(site, config)
    outcome = GroupOutcome(sites=sites, factorization=None, reason="", ranks=[], storage=storage)
    if keep_dense is not None:
        outcome.reason, outcome.notes = keep_dense, extra_notes
        return outcome
    try:
        planned, dense_reason = _planned_rank(site, config, rank_override)
        if dense_reason:  # decided from the shape alone: no need to read or decompose the weight
            outcome.reason, outcome.notes = dense_reason, extra_notes
            outcome.seconds = time.perf_counter() - tick
            return outcome
        weight = load_weight(index, site, base_dir)  # [K, N]
        if not np.all(np.isfinite(weight)):
            raise FactorizationError("weight contains NaN or Inf")
        goal, metric = target(sites, weight)  # [K, N], Lᵀ
        decomposition = decompose(goal, metric, rank=planned, options=svd_options(config))
        outcome.notes = list(decomposition.notes)  # an SVD fallback is reported even if the site stays dense
        ranks, reason, outcome.rank_note = _choose_ranks(site, config, decomposition, rank_override)
        outcome.reason = reason
        if ranks is not None and not config.policy.allow_growth and _flops_reason(site, sum(ranks)):
            ranks, outcome.reason = None, _flops_reason(site, sum(ranks))
        if ranks is not None:
            factorization = truncate(decomposition, ranks, onnx.helper.tensor_dtype_to_np_dtype(storage))
            outcome.notes = list(factorization.notes)  # the decomposition's and every later stage's
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
                note = orientation_note(sites, config)
                outcome.reason = f"{reason}; {note}" if note else reason
    except FactorizationError as error:
        outcome.reason = str(error)
    outcome.notes = extra_notes + outcome.notes
    outcome.seconds = time.perf_counter() - tick
    log.debug("%s: %s", site.name, outcome.reason)
    for note in outcome.notes:
        log.debug("%s: %s", site.name, note)
    return outcome


def weight_groups(sites: Sequence[Site]) -> OrderedDict[str, list[Site]]:
    """Sites grouped by the normalised weight they share, in graph order."""
    groups: OrderedDict[str, list[Site]] = OrderedDict()
    for site in sites:
        groups.setdefault(site.group, []).append(site)
    return groups
