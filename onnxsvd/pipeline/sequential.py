"""Sequential rewrite: compress level by level, fitting each layer to the *compressed* model's inputs.

Legend: T calibration rows, K input channels, N output channels, r rank.

One-shot methods fit every layer to the original model's activations ``X``; once earlier layers are
compressed, a layer actually sees ``X̃``, and errors compound. Here the sites are grouped by depth (the
number of sites upstream of them), and for each level, with every earlier level already compressed:

    G̃ = X̃ᵀX̃ [K, K],   C = X̃ᵀX [K, K]                      (streamed over the calibration data)

- ``whiten``: a closed form. For ``W' = argmin_{rank r} ‖X W − X̃ W'‖_F``, with the least-squares
  solution ``W_ls = G̃⁻¹ C W`` the error splits as ``‖X W − X̃ W_ls‖² + ‖L̃ᵀ (W_ls − W')‖²`` (``G̃ = L̃ L̃ᵀ``),
  so ``W'`` is the whitened truncation of ``W_ls`` in the metric of ``G̃``. In practice both need damping:
  the target is solved with ``λ = ridge`` (pulling it towards the original weight) and the truncation
  runs in the metric damped by ``damping``. With two different λ the result is *not* the exact minimiser
  of either damped problem; it is exact only in the undamped limit.
- ``svd``/``asvd``: ``A`` comes from the method as usual, and the second factor gets its least-squares
  optimum ``B = argmin ‖X W − X̃ A B‖ = (Aᵀ G̃ A)⁻¹ Aᵀ C W``.

The cost is two model runs per level (original and partly compressed, each pruned to that level's
activations), reported in the result.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import scipy.linalg

from onnxsvd import io
from onnxsvd.calibrate.collect import ActivationSpec, activation_rows, expose, session_for, specs_for_sites
from onnxsvd.calibrate.patches import DEFAULT_PATCH_ROWS
from onnxsvd.calibrate.stats import ActivationStats, combine
from onnxsvd.config import Progress, RewriteConfig
from onnxsvd.data import Batches
from onnxsvd.errors import FactorizationError, UsageError
from onnxsvd.factorize import Factorization, Metric, diagonal_metric, identity_metric, whitening_metric
from onnxsvd.graph import GraphIndex, Site, find_sites
from onnxsvd.pipeline.assemble import RewriteResult, assemble, emit_outcomes
from onnxsvd.pipeline.conv_form import choose_conv_forms
from onnxsvd.pipeline.group import GroupOutcome, SpeedCheck, aligned_sites, factor_group, share_floor, weight_groups

__all__ = ["CrossStats", "site_levels", "rewrite_sequential"]

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class CrossStats:
    """Statistics of one activation seen by the compressed (``X̃``) and original (``X``) models.

    Attributes:
        compressed: ``X̃ᵀX̃`` and ``|x̃|`` sums, as :class:`ActivationStats`.
        cross: ``[K, K]`` ``X̃ᵀX``.
    """

    compressed: ActivationStats
    cross: np.ndarray


def site_levels(model: onnx.ModelProto, sites: Iterable[Site]) -> dict[int, int]:
    """Level of each site (by node index): the largest number of sites on any path into its activation."""
    by_index = {site.node_index: site for site in sites}
    depth: dict[str, int] = {}
    levels: dict[int, int] = {}
    for position, node in enumerate(model.graph.node):  # graph.node is topologically sorted
        incoming = max((depth.get(name, 0) for name in node.input if name), default=0)
        if position in by_index:
            levels[position] = incoming
            incoming += 1
        for name in node.output:
            depth[name] = incoming
    return levels


def _collect_cross(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    specs: list[ActivationSpec],
    batches: Batches,
    providers: tuple[str, ...],
    mask_input: str | None,
    base_dir: str | None = None,
) -> dict[str, CrossStats]:
    """Run both models on every batch, exposing ``specs``, and accumulate ``X̃ᵀX̃``, ``X̃ᵀX`` per spec."""
    tensors = list(dict.fromkeys((spec.tensor, spec.elem_type) for spec in specs))
    names = [name for name, _ in tensors]
    sessions = []
    for model in (original, compressed):
        exposed = expose(model, tensors)
        sessions.append((session_for(exposed, providers, base_dir=base_dir), [o.name for o in exposed.graph.output]))
    gram = {spec.key: np.zeros((spec.channels, spec.channels)) for spec in specs}  # X̃ᵀX̃ [K, K]
    cross = {spec.key: np.zeros((spec.channels, spec.channels)) for spec in specs}  # X̃ᵀX [K, K]
    abs_sum = {spec.key: np.zeros(spec.channels) for spec in specs}  # Σ|x̃| [K]
    abs_max = {spec.key: np.zeros(spec.channels) for spec in specs}  # max|x̃| [K]
    rows = dict.fromkeys(gram, 0)
    for batch_index, batch in enumerate(batches()):
        outputs = []
        for session, output_names in sessions:
            feed_names = {value.name for value in session.get_inputs()}
            feed = {name: value for name, value in batch.items() if name in feed_names}
            outputs.append(dict(zip(names, session.run(output_names, feed), strict=True)))
        mask = batch.get(mask_input) if mask_input else None
        for spec in specs:
            # The same positions of both models (a Conv input's patches are sampled by batch and shape).
            x = activation_rows(spec, outputs[0][spec.tensor], mask, batch_index=batch_index)[0]  # X [T, K]
            x_tilde = activation_rows(spec, outputs[1][spec.tensor], mask, batch_index=batch_index)[0]  # X̃ [T, K]
            x, x_tilde = x.astype(np.float64), x_tilde.astype(np.float64)
            gram[spec.key] += x_tilde.T @ x_tilde  # [K, K]
            cross[spec.key] += x_tilde.T @ x  # [K, K]
            magnitude = np.abs(x_tilde)  # [T, K]
            abs_sum[spec.key] += magnitude.sum(axis=0)
            if magnitude.shape[0]:
                np.maximum(abs_max[spec.key], magnitude.max(axis=0), out=abs_max[spec.key])
            rows[spec.key] += x.shape[0]
    return {
        key: CrossStats(ActivationStats(gram[key], abs_sum[key], abs_max[key], rows[key]), cross[key]) for key in gram
    }


def _combined(sites: list[Site], stats: Mapping[str, CrossStats]) -> CrossStats:
    """The group's statistics: summed over the distinct activations of the sites that read the weight in
    the first site's orientation (see :func:`onnxsvd.pipeline.group.aligned_sites`)."""
    keys = dict.fromkeys(site.statistics_key for site in aligned_sites(sites))
    parts = [stats[key] for key in keys]
    if len(parts) == 1:
        return parts[0]
    return CrossStats(combine(p.compressed for p in parts), sum(p.cross for p in parts))


def _require_finite(name: str, *arrays: np.ndarray) -> None:
    if not all(np.all(np.isfinite(array)) for array in arrays):
        raise FactorizationError(f"degenerate statistics: {name} holds NaN or Inf (the compressed model overflows)")


def _damped_solve(gram: np.ndarray, rhs: np.ndarray, damping: float) -> np.ndarray:
    """``(G + λ·mean(diag G)·I)⁻¹ · rhs`` by Cholesky, by least squares if that fails (``G`` ``[K, K]``,
    ``rhs`` ``[K, M]``).

    Raises:
        FactorizationError: non-finite input, an all-zero ``G``, or neither solve gives a finite answer.
    """
    _require_finite("the least-squares system", gram, rhs)
    scale = float(np.mean(np.diag(gram)))
    if scale <= 0.0:
        raise FactorizationError("degenerate statistics: compressed-model activations are all zero")
    damped = 0.5 * (gram + gram.T) + max(damping, 1e-10) * scale * np.eye(gram.shape[0])  # [K, K]
    try:
        solution = scipy.linalg.cho_solve(scipy.linalg.cho_factor(damped, lower=True), rhs)  # [K, M]
    except np.linalg.LinAlgError:
        try:
            solution = scipy.linalg.lstsq(damped, rhs)[0]  # [K, M]
        except (np.linalg.LinAlgError, ValueError) as error:
            raise FactorizationError(f"least-squares solve failed ({error})") from error
    if not np.all(np.isfinite(solution)):
        raise FactorizationError("least-squares solve failed (NaN or Inf in the solution)")
    return solution


def rewrite_sequential(
    model: onnx.ModelProto,
    config: RewriteConfig,
    batches: Batches,
    providers: tuple[str, ...] = ("cpu",),
    mask_input: str | None = None,
    base_dir: str | None = None,
    progress: Progress | None = None,
    speed_check: SpeedCheck | None = None,
    patch_rows: int | None = DEFAULT_PATCH_ROWS,
    seed: int = 0,
) -> RewriteResult:
    """Rewrite ``model`` level by level against the partly compressed model's own activations.

    Args:
        model: the original model (not modified).
        config: as for :func:`onnxsvd.rewrite`; ``method`` picks the closed form (``whiten``) or the
            least-squares refit of ``B`` (``svd``, ``asvd``).
        batches: a callable returning a fresh iterable of calibration input dicts.
        providers: ONNX Runtime providers.
        mask_input: a ``[B, S]`` token-mask input whose zero rows are left out.
        base_dir: folder of the model file (external data).
        progress: callback per level.
        speed_check: applied to each level's factorized groups before the next level sees them (keeps
            dense the groups whose chain is not faster).
        patch_rows: im2col patches kept per batch of each Conv input (sampled with ``seed`` past it; the
            original's and the compressed model's at the same positions).

    Returns:
        The rewritten model and its report; the report's notes give the levels and their cost.
    """
    if config.quantize is not None:
        raise UsageError("a quantized rewrite runs sequentially through rewrite_quantized(..., sequential=True)")
    started = time.perf_counter()
    params_before, bytes_before = io.count_parameters(model), io.count_bytes(model)
    original = model
    working = copy.deepcopy(model)
    match = find_sites(working, config)
    index = GraphIndex(working.graph)
    match = choose_conv_forms(match, index, config, None, base_dir)  # data-free: no statistics of the original yet
    groups = weight_groups(match.sites)
    levels = site_levels(working, match.sites)
    group_level = {key: min(levels[s.node_index] for s in sites) for key, sites in groups.items()}
    order = sorted(set(group_level.values()))
    kept_dense = share_floor(groups, config)
    outcomes: dict[str, GroupOutcome] = {}
    compressed = original
    collect_seconds = 0.0
    for step, level in enumerate(order, start=1):
        level_groups = {key: groups[key] for key in groups if group_level[key] == level}
        level_sites = [site for sites in level_groups.values() for site in sites]
        tick = time.perf_counter()
        stats = _collect_cross(
            original, compressed, specs_for_sites(level_sites, patch_rows, seed), batches, providers, mask_input,
            base_dir,
        )
        collect_seconds += time.perf_counter() - tick
        for key, sites in level_groups.items():
            target, refit = _level_fit(config, _combined(sites, stats))
            outcomes[key] = factor_group(index, sites, config, target, base_dir, refit, keep_dense=kept_dense.get(key))
        if speed_check is not None:  # before the next level is fitted to this one's inputs
            checked = speed_check(working, [outcomes[key] for key in level_groups], base_dir)
            outcomes.update((outcome.sites[0].group, outcome) for outcome in checked)
        # The next level sees this one compressed: rebuild from the original with every outcome so far.
        compressed = emit_outcomes(copy.deepcopy(original), list(outcomes.values()), config)
        if progress is not None:
            progress(step, len(order), f"level {level}")
    result = assemble(
        working, match, [outcomes[key] for key in groups], config, params_before, started, bytes_before=bytes_before,
        source_fingerprint=io.fingerprint(original, base_dir),
    )
    result.report.notes.append(
        f"sequential: {len(order)} levels, {2 * len(order)} pruned model runs over the calibration data; "
        f"{collect_seconds:.1f} s collecting, {result.report.seconds:.1f} s in all"
    )
    return result


def _level_fit(config: RewriteConfig, stats: CrossStats):
    """The target function and refit for one group at its level (see the module docstring)."""
    gram, cross = stats.compressed.gram, stats.cross  # G̃ [K, K], C = X̃ᵀX [K, K]

    def target(sites: list[Site], weight: np.ndarray) -> tuple[np.ndarray, Metric]:
        _require_finite("the compressed model's Gram X̃ᵀX̃ or cross Gram X̃ᵀX", gram, cross)
        if config.method == "whiten":
            # W_ls = (G̃ + λI)⁻¹ (C W + λ W), λ = ridge·mean(diag G̃): ridge towards the original weight, not
            # towards zero, so directions the calibration data barely visits keep the layer's own behaviour.
            # The truncation then runs in the metric of G̃ damped by `damping`, a different λ: so this is a
            # closed form, not the exact minimiser of the ridge-damped problem (that would need one λ for
            # both; measured, it scored below one-shot whitening on tests/test_calibrate's deep MLP).
            ridge = max(config.ridge, 1e-10) * float(np.mean(np.diag(gram)))
            least_squares = _damped_solve(gram, cross @ weight + ridge * weight, config.ridge)  # [K, N]
            _require_finite("the least-squares target", least_squares)
            return least_squares, whitening_metric(gram, damping=config.damping)
        if config.method == "asvd":
            return weight, diagonal_metric(stats.compressed.mean_abs, alpha=config.alpha)
        return weight, identity_metric()

    def refit(sites: list[Site], weight: np.ndarray, factorization: Factorization) -> Factorization:
        # B = (Aᵀ G̃ A)⁻¹ Aᵀ C W, for the fused A; then split back into the stages' rows.
        a_fused, _ = factorization.fused()  # [K, R]
        a64 = a_fused.astype(np.float64)
        normal = a64.T @ gram @ a64  # [R, R]
        rhs = a64.T @ (cross @ weight)  # [R, N]
        b_fused = _damped_solve(normal, rhs, config.damping)  # [R, N]
        dtype = a_fused.dtype
        stages, start = [], 0
        for a, _ in factorization.stages:
            width = a.shape[1]
            stages.append((a, b_fused[start : start + width].astype(dtype)))
            start += width
        return Factorization(stages=tuple(stages), kept_energy=factorization.kept_energy, notes=factorization.notes)

    return target, (None if config.method == "whiten" else refit)
