"""The quantized rewrite: each site's weight quantized by ONNX Runtime, a low-rank branch fitted to its error.

Legend: K input channels, N output channels, r the correction's rank, T calibration rows.

Per weight group, with ``Ŵ = deq(Q(W))`` read back from ONNX Runtime's own kernel
(:func:`onnxsvd.quantize.quantize_weight`):

    E = W − Ŵ                                       # [K, N], the quantization error
    A B = L⁻ᵀ · trunc_r(Lᵀ E)                        # the best rank-r fit of E in the data metric

with ``Lᵀ`` the rewrite's metric: identity (``svd``, LoRC), ``diag(mean|x|^α)`` (``asvd``, LQER) or the
Cholesky factor of ``XᵀX`` (``whiten``, QERA-like): ``‖X W − X (Ŵ + A B)‖_F = ‖Lᵀ (E − A B)‖_F``. The rank
policy (``--rank``, ``--ratio``, ``--energy``, ``--stages``, ``--allocate global``) sets ``r``; the byte
guard weighs ``base + r·(K+N)·b_f`` against the dense weight as stored.

Sequential (``sequential=True``): level by level, each level is fitted to the inputs ``X̃`` that the
already quantized and corrected model gives it, with ``G̃ = X̃ᵀX̃`` and ``C = X̃ᵀX``:

    min_{rank r} ‖X W − X̃ (Ŵ + A B)‖ :   A B = trunc_r, in the metric of G̃, of  W_ls − Ŵ,
    W_ls = (G̃ + λI)⁻¹ (C W + λ W)                    # the sequential rewrite's ridge target

for ``whiten`` (the same split as :mod:`onnxsvd.pipeline.sequential`), and for ``svd``/``asvd`` ``A`` from
the method and ``B = (Aᵀ G̃ A)⁻¹ Aᵀ (C W − G̃ Ŵ)``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate.collect import specs_for_sites
from onnxsvd.calibrate.stats import Statistics
from onnxsvd.config import VERSION, Progress, RewriteConfig
from onnxsvd.data import Batches
from onnxsvd.errors import FactorizationError, StatsError, UsageError
from onnxsvd.factorize import (
    Factorization,
    FactorRounding,
    Metric,
    decompose,
    diagonal_metric,
    identity_metric,
    round_int8,
    spectrum,
    split_rank,
    truncate,
    whitening_metric,
)
from onnxsvd.graph import (
    QUANTIZED_OPS,
    FactorTensors,
    GraphIndex,
    Match,
    QuantizedGroup,
    Site,
    Skip,
    activation_ranks,
    dtype_name,
    emit_quantized,
    find_sites,
    load_weight,
    node_name,
    storage_dtype_for,
)
from onnxsvd.pipeline.assemble import RewriteResult
from onnxsvd.pipeline.group import group_statistics, metric_for, svd_options, weight_groups
from onnxsvd.pipeline.report import RewriteReport, SiteReport
from onnxsvd.pipeline.sequential import (
    CrossStats,
    _collect_cross,
    _combined,
    _damped_solve,
    _require_finite,
    site_levels,
)
from onnxsvd.quantize import QuantizedWeight, quantize_weight
from onnxsvd.rank import AllocationSite, ByteCost, allocate_budget, allocate_energy, choose_rank, guard_rank

__all__ = ["QuantOutcome", "correction_bytes", "factor_storage", "rewrite_quantized"]

log = logging.getLogger(__name__)

#: ``(sites, W [K, N], Ŵ [K, N]) → (target [K, N], metric)``: what the correction fits, in which metric.
QuantTargetFn = Callable[[list[Site], np.ndarray, np.ndarray], "tuple[np.ndarray, Metric]"]
#: Optionally replaces the correction's factors (the sequential rewrite's least-squares ``B``).
QuantRefitFn = Callable[[list[Site], np.ndarray, np.ndarray, Factorization], Factorization]


@dataclasses.dataclass
class QuantOutcome:
    """What happened to one weight group: quantized (with or without a correction), or kept dense."""

    sites: list[Site]
    storage: int
    reason: str = ""
    weight: QuantizedWeight | None = None
    factorization: Factorization | None = None
    ranks: list[int] = dataclasses.field(default_factory=list)
    kept_energy: float | None = None
    base_error: float | None = None
    weight_error: float | None = None
    seconds: float = 0.0

    @property
    def quantized(self) -> bool:
        return self.weight is not None

    @property
    def rank(self) -> int:
        return self.factorization.rank if self.factorization is not None else 0


def rewrite_quantized(
    model: onnx.ModelProto,
    config: RewriteConfig,
    statistics: Statistics | None = None,
    base_dir: str | None = None,
    progress: Progress | None = None,
    batches: Batches | None = None,
    sequential: bool = False,
    providers: tuple[str, ...] = ("cpu",),
    mask_input: str | None = None,
    data_file: io.DataFile | None = None,
) -> RewriteResult:
    """Quantize every eligible MatMul/Gemm of ``model`` with ONNX Runtime and add a low-rank correction.

    Args:
        model: the model; not modified.
        config: the rewrite configuration; ``config.quantize`` says how to quantize, the rank policy and
            method how to fit the correction.
        statistics: calibration statistics of this model (``asvd``, ``whiten`` one-shot).
        base_dir: folder of the model file, for external data.
        progress: callback after each weight (each level with ``sequential``).
        batches: calibration batches (a callable giving a fresh iterable); needed by ``sequential``.
        sequential: fit each level to the inputs the already quantized and corrected model gives it.
        providers: ONNX Runtime providers of the sequential model runs.
        mask_input: a ``[B, S]`` token mask whose zero rows the sequential statistics leave out.
        data_file: the output's data file: the new tensors are written there as they are made.

    Returns:
        The rewritten model and a report of every MatMul/Gemm (and of every already quantized node).

    Raises:
        UsageError: no ``quantize`` in ``config``, a method without its statistics, or an option that the
            quantized rewrite does not take.
        StatsError: statistics of another model.
    """
    quantize = config.quantize
    if quantize is None:
        raise UsageError("rewrite_quantized needs RewriteConfig(quantize=QuantizeConfig(...))")
    started = time.perf_counter()
    _check_options(model, config, statistics, batches, sequential)
    params_before, bytes_before = io.count_parameters(model), io.count_bytes(model)
    original = model
    model = copy.deepcopy(model)
    match = _without_quantized(model, find_sites(model, config))
    index = GraphIndex(model.graph)
    groups = weight_groups(match.sites)
    ranks_of_activations = activation_ranks(model, match.sites)
    cache = _QuantizedCache(index, config, base_dir)
    notes: list[str] = []
    outcomes: dict[str, QuantOutcome] = {}
    if sequential:
        assert batches is not None
        levels = site_levels(model, match.sites)
        group_level = {key: min(levels[s.node_index] for s in sites) for key, sites in groups.items()}
        order = sorted(set(group_level.values()))
        compressed = original
        for step, level in enumerate(order, start=1):
            level_groups = {key: sites for key, sites in groups.items() if group_level[key] == level}
            level_sites = [site for sites in level_groups.values() for site in sites]
            stats = _collect_cross(
                original, compressed, specs_for_sites(level_sites), batches, providers, mask_input, base_dir
            )
            for key, sites in level_groups.items():
                target, refit = _sequential_fit(config, _combined(sites, stats))
                outcomes[key] = _fit_group(sites, config, cache, target, refit, ranks_of_activations)
            compressed = emit_quantized(
                copy.deepcopy(original), _emitted(outcomes.values()), ranks=ranks_of_activations
            )
            if progress is not None:
                progress(step, len(order), f"level {level}")
        notes.append(f"sequential: {len(order)} levels, {2 * len(order)} pruned model runs over the calibration data")
    else:
        def target(sites: list[Site], weight: np.ndarray, dequantized: np.ndarray) -> tuple[np.ndarray, Metric]:
            return weight - dequantized, metric_for(config, group_statistics(sites, statistics))  # E [K, N]

        overrides: dict[str, int] = {}
        if config.allocate == "global" and quantize.correction:
            overrides, allocation_notes = _global_ranks(groups, config, cache, target)
            notes.extend(allocation_notes)
        for done, (key, sites) in enumerate(groups.items(), start=1):
            outcomes[key] = _fit_group(
                sites, config, cache, target, None, ranks_of_activations, rank_override=overrides.get(key)
            )
            cache.drop(key)
            if progress is not None:
                progress(done, len(groups), sites[0].name)
    ordered = [outcomes[key] for key in groups]
    emit_quantized(model, _emitted(ordered), FactorTensors(model, data_file), ranks_of_activations)
    if any(outcome.quantized for outcome in ordered):
        _stamp(model, config)
    report = _report(model, match, ordered, config, params_before, bytes_before, started)
    report.notes.extend(notes)
    report.notes.append(_summary(ordered, config))
    return RewriteResult(model, report)


def _check_options(
    model: onnx.ModelProto,
    config: RewriteConfig,
    statistics: Statistics | None,
    batches: Batches | None,
    sequential: bool,
) -> None:
    opset = next((int(e.version) for e in model.opset_import if e.domain in ("", "ai.onnx")), 1)
    if sequential and batches is None:
        raise UsageError("--sequential needs calibration data: pass --data DATA")
    if not sequential and config.needs_statistics and statistics is None:
        raise UsageError(f"--method {config.method} needs calibration data: pass --stats stats.npz or --data DATA")
    if statistics is not None and statistics.fingerprint != io.fingerprint(model):
        raise StatsError(
            "the statistics were collected on another model (fingerprint mismatch); "
            "re-run 'onnxsvd calibrate' on this model"
        )
    if config.dtype != "auto":
        raise UsageError("with --quantize the correction's storage is --factor-dtype fp32|fp16|int8: drop --dtype")
    if config.quantize.factor_dtype == "int8" and opset < 13:  # type: ignore[union-attr]
        raise UsageError(f"--factor-dtype int8 needs opset 13 (DequantizeLinear per axis), the model has {opset}")
    if config.layout != "fused":
        raise UsageError("--quantize emits one fused correction branch per site: drop --layout stages")
    if sequential and config.allocate == "global":
        raise UsageError("--quantize with --sequential takes uniform ranks: drop --allocate global")
    if opset < 7:
        raise UsageError(f"--quantize needs opset 7 or later (broadcasting Add), the model has opset {opset}")


def _without_quantized(model: onnx.ModelProto, match: Match) -> Match:
    """Sites whose weight is already quantized (behind ``DequantizeLinear``) become skips, and so does every
    node that already holds a quantized linear layer (``MatMulNBits``, ``MatMulInteger``…): quantizing again
    would stack a second rounding on the first. Both are left as they are, with that reason."""
    sites, skips = [], list(match.skips)
    graph = model.graph
    for site in match.sites:
        dequantize = [p for p in site.weight.chain if graph.node[p].op_type == "DequantizeLinear"]
        if site.conv is not None:
            reason = "Conv sites are not quantized (MatMulNBits is a MatMul kernel): kept as it is under --quantize"
            skips.append(Skip(site.name, site.op_type, site.node_index, reason, site.shape, site.dense_bytes))
        elif dequantize:
            reason = (
                f"weight is already quantized ({dtype_name(site.weight.storage_dtype)} behind DequantizeLinear): "
                "--quantize takes the float model"
            )
            skips.append(Skip(site.name, site.op_type, site.node_index, reason, site.shape, site.dense_bytes))
        else:
            sites.append(site)
    for position, node in enumerate(graph.node):
        if node.op_type in QUANTIZED_OPS:
            reason = f"already quantized ({node.op_type}): left as it is; --quantize takes the float model"
            skips.append(Skip(node_name(node, position), node.op_type, position, reason))
    skips.sort(key=lambda skip: skip.node_index)
    return Match(sites=tuple(sites), skips=tuple(skips))


class _QuantizedCache:
    """Each group's weight and its quantization, computed once (global allocation reads them twice)."""

    def __init__(self, index: GraphIndex, config: RewriteConfig, base_dir: str | None) -> None:
        self.index, self.config, self.base_dir = index, config, base_dir
        self.held: dict[str, tuple[np.ndarray, QuantizedWeight]] = {}

    def get(self, site: Site) -> tuple[np.ndarray, QuantizedWeight]:
        """``(W [K, N] float64, its quantization)``.

        Raises:
            FactorizationError: the weight holds NaN or Inf, or ONNX Runtime cannot quantize it.
        """
        if site.group in self.held:
            return self.held[site.group]
        weight = load_weight(self.index, site, self.base_dir)  # [K, N]
        if not np.all(np.isfinite(weight)):
            raise FactorizationError("weight contains NaN or Inf")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(site.weight.compute_dtype)
        quantized = quantize_weight(weight, dtype, self.config.quantize)  # type: ignore[arg-type]
        self.held[site.group] = (weight, quantized)
        return weight, quantized

    def drop(self, key: str) -> None:
        self.held.pop(key, None)


def _stage_ranks(config: RewriteConfig, total: int) -> list[int]:
    return split_rank(total, min(config.stages, total))


def factor_storage(site: Site, config: RewriteConfig) -> int:
    """ONNX dtype the correction's factors are stored in (``--factor-dtype``; ``auto``: the weight's own
    float dtype; ``int8``: ``TensorProto.INT8``, with one scale per rank component in the compute dtype)."""
    requested = config.quantize.factor_dtype  # type: ignore[union-attr]
    return onnx.TensorProto.INT8 if requested == "int8" else storage_dtype_for(site, requested)


def correction_bytes(site: Site, storage: int, rank: int) -> int:
    """``r·(K+N)`` factor values in their dtype, plus the ``2·r`` scales of int8 factors."""
    values = io.dtype_bytes(storage, rank * (site.k + site.n))
    if storage == onnx.TensorProto.INT8:
        values += io.dtype_bytes(site.weight.compute_dtype, 2 * rank)
    return values


def _fit_rounding(site: Site, storage: int) -> tuple[np.dtype, FactorRounding | None]:
    """The dtype the factors are held in while fitting, and the storage's rounding beyond a cast."""
    if storage != onnx.TensorProto.INT8:
        return onnx.helper.tensor_dtype_to_np_dtype(storage), None
    compute = onnx.helper.tensor_dtype_to_np_dtype(site.weight.compute_dtype)

    def rounding(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return round_int8(a, 1, compute), round_int8(b, 0, compute)  # [K, r], [r, N]: a scale per component

    return compute, rounding


def _correction_cost(site: Site, config: RewriteConfig, base_bytes: int) -> ByteCost:
    """What the correction may spend: the dense weight's bytes less the base's, per factor value (int8
    factors' ``2·r`` scales are counted in the report, not by this guard)."""
    storage = factor_storage(site, config)
    weight = dtype_name(site.weight.storage_dtype)
    label = f"the {weight} weight less its {base_bytes:,} B quantized base; {dtype_name(storage)} factors"
    return ByteCost(site.dense_bytes - base_bytes, io.dtype_bytes(storage, 1), label)


def _fit_group(
    sites: list[Site],
    config: RewriteConfig,
    cache: _QuantizedCache,
    target: QuantTargetFn,
    refit: QuantRefitFn | None,
    activation_rank_of: Mapping[str, int | None],
    rank_override: int | None = None,
) -> QuantOutcome:
    """Quantize one group's weight, fit its correction, and check both against the dense weight's bytes.

    Every failure keeps the group dense with its reason; nothing falls back silently.
    """
    site = sites[0]
    quantize = config.quantize
    assert quantize is not None
    tick = time.perf_counter()
    storage = factor_storage(site, config)
    outcome = QuantOutcome(sites=sites, storage=storage)
    try:
        unknown = [s.name for s in sites if s.name in activation_rank_of and activation_rank_of[s.name] is None]
        if unknown:
            raise FactorizationError(
                "weight on the left and the activation's rank is unknown (its transposes need it): add shapes "
                "to the model's inputs"
            )
        weight, quantized = cache.get(site)
        dequantized = quantized.dequantized  # Ŵ [K, N]
        base = quantized.base_bytes
        if base >= site.dense_bytes and not config.policy.allow_growth:
            raise FactorizationError(
                f"quantized base {base:,} B ≥ dense {site.dense_bytes:,} B "
                f"({dtype_name(site.weight.storage_dtype)} weight, {quantize.label}); use --allow-growth to force"
            )
        norm = float(np.linalg.norm(weight))
        outcome.base_error = float(np.linalg.norm(weight - dequantized)) / norm if norm > 0 else 0.0
        factorization, ranks, how = None, [], f"{quantize.label} base {base:,} B"
        if quantize.correction:
            factorization, ranks, how = _correction(site, sites, config, target, refit, weight, dequantized, base,
                                                    rank_override)
            outcome.kept_energy = factorization.kept_energy
        corrected = dequantized + (factorization.product() if factorization is not None else 0.0)  # [K, N]
        error = float(np.linalg.norm(weight - corrected)) / norm if norm > 0 else 0.0
        if not np.isfinite(error):
            raise FactorizationError("the correction overflows the factor dtype (NaN/Inf)")
        outcome.weight, outcome.factorization, outcome.ranks = quantized, factorization, ranks
        outcome.weight_error = error
        outcome.reason = how
    except FactorizationError as error:
        outcome.reason = str(error)
    outcome.seconds = time.perf_counter() - tick
    log.debug("%s: %s", site.name, outcome.reason)
    return outcome


def _correction(
    site: Site,
    sites: list[Site],
    config: RewriteConfig,
    target: QuantTargetFn,
    refit: QuantRefitFn | None,
    weight: np.ndarray,
    dequantized: np.ndarray,
    base: int,
    rank_override: int | None,
) -> tuple[Factorization, list[int], str]:
    """The correction's factors, stage ranks and the reason line; ``FactorizationError`` when none fits."""
    cost = _correction_cost(site, config, base)
    goal, metric = target(sites, weight, dequantized)  # [K, N], Lᵀ
    policy = config.policy
    if policy.min_rank is None:
        # The default floor (--align) guards a layer replaced by its factors; a correction adds to the
        # quantized base, so a low rank only corrects less: no default floor (an explicit --min-rank holds).
        policy = dataclasses.replace(policy, min_rank=1)
    if rank_override is not None:
        decision = guard_rank(f"global allocation: rank {rank_override}", rank_override, site.k, site.n, cost,
                              policy.allow_growth)
        decomposition = decompose(goal, metric, rank=decision.rank or None, options=svd_options(config))
    elif config.stage_ranks is not None:
        total = sum(config.stage_ranks)
        if total > min(site.k, site.n):
            raise FactorizationError(f"--stage-ranks sum {total} exceeds min(K, N) = {min(site.k, site.n)}")
        decision = guard_rank(f"--stage-ranks {','.join(map(str, config.stage_ranks))}", total, site.k, site.n,
                              cost, policy.allow_growth)
        decomposition = decompose(goal, metric, rank=total, options=svd_options(config))
    else:
        planned = None if policy.kind == "energy" else choose_rank(policy, site.k, site.n, None, cost)
        decomposition = decompose(goal, metric, rank=planned.rank if planned and not planned.dense else None,
                                  options=svd_options(config))
        decision = choose_rank(policy, site.k, site.n, decomposition.s, cost)
    if decision.dense:
        raise FactorizationError(f"correction: {decision.reason}")
    ranks = list(config.stage_ranks) if config.stage_ranks is not None and rank_override is None else (
        _stage_ranks(config, decision.rank)
    )
    storage = factor_storage(site, config)
    held, rounding = _fit_rounding(site, storage)
    factorization = truncate(decomposition, ranks, held, rounding)
    if refit is not None:
        factorization = refit(sites, weight, dequantized, factorization)
        if rounding is not None:  # the refitted B goes back to its storage too
            factorization = Factorization(
                stages=tuple((a, rounding(a, b)[1]) for a, b in factorization.stages),
                kept_energy=factorization.kept_energy,
            )
    correction = correction_bytes(site, storage, factorization.rank)
    how = (
        f"{config.quantize.label} base {base:,} B + rank {factorization.rank} correction {correction:,} B "  # type: ignore[union-attr]
        f"({decision.reason})"
    )
    return factorization, ranks, how


def _global_ranks(
    groups: Mapping[str, list[Site]], config: RewriteConfig, cache: _QuantizedCache, target: QuantTargetFn
) -> tuple[dict[str, int], list[str]]:
    """Correction ranks from one budget over all sites, by the error energy each rank step removes in the
    data metric (:func:`onnxsvd.rank.allocate_budget`; ``--ratio`` is the correction's share of the sites'
    parameters, ``--energy`` the kept share of all their error energy)."""
    policy = config.policy
    if policy.kind == "rank" or config.stage_ranks is not None:
        raise UsageError("--allocate global takes --ratio (a budget over all sites) or --energy, not a fixed rank")
    candidates = []
    for key, sites in groups.items():
        try:
            weight, quantized = cache.get(sites[0])
            goal, metric = target(sites, weight, quantized.dequantized)
            candidates.append(AllocationSite(key, sites[0].k, sites[0].n, spectrum(goal, metric)))
        except FactorizationError:
            continue  # _fit_group keeps it dense with the reason
    if not candidates:
        return {}, []
    if policy.kind == "ratio":
        allocation = allocate_budget(candidates, policy.value, policy.align)
        note = (
            f"global allocation of the corrections: {allocation.params:,} of a {allocation.budget:,}-parameter budget "
            f"(ratio {policy.value:g} of all sites' parameters), by error energy in the {config.method} metric; "
            "sensitivities are not measured for corrections (each site's error energy counts as it is)"
        )
    else:
        allocation = allocate_energy(candidates, policy.value, policy.align)
        note = f"global allocation of the corrections: energy {policy.value:g} of all sites' error energy"
    return dict(allocation.ranks), [note]


def _sequential_fit(config: RewriteConfig, stats: CrossStats) -> tuple[QuantTargetFn, QuantRefitFn | None]:
    """The target and refit of one group at its level (see the module docstring)."""
    gram, cross = stats.compressed.gram, stats.cross  # G̃ [K, K], C = X̃ᵀX [K, K]

    def target(sites: list[Site], weight: np.ndarray, dequantized: np.ndarray) -> tuple[np.ndarray, Metric]:
        _require_finite("the compressed model's Gram X̃ᵀX̃ or cross Gram X̃ᵀX", gram, cross)
        if config.method == "whiten":
            ridge = max(config.ridge, 1e-10) * float(np.mean(np.diag(gram)))
            least_squares = _damped_solve(gram, cross @ weight + ridge * weight, config.ridge)  # W_ls [K, N]
            _require_finite("the least-squares target", least_squares)
            return least_squares - dequantized, whitening_metric(gram, damping=config.damping)  # [K, N]
        if config.method == "asvd":
            return weight - dequantized, diagonal_metric(stats.compressed.mean_abs, alpha=config.alpha)
        return weight - dequantized, identity_metric()

    def refit(
        sites: list[Site], weight: np.ndarray, dequantized: np.ndarray, factorization: Factorization
    ) -> Factorization:
        # B = (Aᵀ G̃ A)⁻¹ Aᵀ (C W − G̃ Ŵ): the second factor's optimum for the inputs X̃ the layer really gets.
        a_fused, _ = factorization.fused()  # [K, R]
        a64 = a_fused.astype(np.float64)
        normal = a64.T @ gram @ a64  # [R, R]
        rhs = a64.T @ (cross @ weight - gram @ dequantized)  # [R, N]
        b_fused = _damped_solve(normal, rhs, config.damping)  # [R, N]
        stages, start = [], 0
        for a, _ in factorization.stages:
            width = a.shape[1]
            stages.append((a, b_fused[start : start + width].astype(a_fused.dtype)))
            start += width
        return Factorization(stages=tuple(stages), kept_energy=factorization.kept_energy)

    return target, (None if config.method == "whiten" else refit)


def _emitted(outcomes) -> list[QuantizedGroup]:
    return [
        QuantizedGroup(o.sites, o.weight, o.factorization, o.storage) for o in outcomes if o.weight is not None
    ]


def _report(
    model: onnx.ModelProto,
    match: Match,
    outcomes: list[QuantOutcome],
    config: RewriteConfig,
    params_before: int,
    bytes_before: int,
    started: float,
) -> RewriteReport:
    label = config.quantize.label  # type: ignore[union-attr]
    reports: dict[int, SiteReport] = {}
    for outcome in outcomes:
        names = [s.name for s in outcome.sites]
        for member in outcome.sites:
            done = outcome.quantized
            correction = correction_bytes(member, outcome.storage, outcome.rank) if done else 0
            base = outcome.weight.base_bytes if outcome.weight is not None else 0
            reports[member.node_index] = SiteReport(
                name=member.name,
                op_type=member.op_type,
                shape=[member.k, member.n],
                action="factorized" if done else "kept",
                reason=outcome.reason,
                rank=outcome.rank if done else 0,
                stage_ranks=outcome.ranks if done else [],
                params_before=member.params,
                params_after=member.params + outcome.rank * (member.k + member.n) if done else member.params,
                dense_bytes=member.dense_bytes,
                factor_bytes=base + correction,
                kept_energy=outcome.kept_energy if done else None,
                weight_error=outcome.weight_error if done else None,
                shared_with=[n for n in names if n != member.name],
                seconds=outcome.seconds,
                base=label if done else None,
                base_bytes=base,
                correction_bytes=correction,
                base_error=outcome.base_error if done else None,
            )
    for skip in match.skips:
        params = int(np.prod(skip.shape)) if skip.shape else 0
        reports[skip.node_index] = SiteReport(
            name=skip.name, op_type=skip.op_type,
            shape=list(skip.shape) if skip.shape and len(skip.shape) == 2 else None,
            action="kept", reason=skip.reason, params_before=params, params_after=params,
            dense_bytes=skip.dense_bytes,
        )
    policy = "quantize only (--rank 0)" if not config.quantize.correction else (  # type: ignore[union-attr]
        config.policy.describe() if config.stage_ranks is None else f"stage ranks {list(config.stage_ranks)}"
    )
    report = RewriteReport(
        input=None,
        output=None,
        method=config.method,
        policy=f"{label} base; correction: {policy}",
        layout=config.layout,
        stages=config.stages,
        params_before=params_before,
        params_after=io.count_parameters(model),
        bytes_before=bytes_before,
        bytes_after=io.count_bytes(model),
        sites=[reports[position] for position in sorted(reports)],
        seconds=time.perf_counter() - started,
    )
    log.info("quantized %d of %d MatMul/Gemm nodes (%s)", len(report.factorized), len(report.sites), label)
    return report


def _summary(outcomes: list[QuantOutcome], config: RewriteConfig) -> str:
    done = [o for o in outcomes if o.quantized]
    dense = sum(site.dense_bytes for o in done for site in o.sites[:1])
    base = sum(o.weight.base_bytes for o in done if o.weight is not None)
    correction = sum(correction_bytes(o.sites[0], o.storage, o.rank) for o in done)
    share = (base + correction) / dense if dense else math.nan
    return (
        f"quantized: {len(done)} weights with ONNX Runtime's quantizer ({config.quantize.label}, "  # type: ignore[union-attr]
        f"MatMulNBits); base {base:,} B + correction {correction:,} B = {base + correction:,} B, "
        f"{share:.3f} of their {dense:,} B as stored"
    )


def _stamp(model: onnx.ModelProto, config: RewriteConfig) -> None:
    entries = {
        "onnxsvd.version": VERSION,
        "onnxsvd.method": config.method,
        "onnxsvd.policy": config.policy.describe(),
        "onnxsvd.quantize": config.quantize.label,  # type: ignore[union-attr]
    }
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)



