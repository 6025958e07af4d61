"""``--conv auto``: per Conv weight, the factor form (channel or spatial) with the smaller output error at
the same parameter count.

Legend: N output channels, C input channels, k_h×k_w the kernel, K_c = C·k_h·k_w, K_s = C·k_h, N_s = k_w·N.

Both forms approximate one kernel, so both are judged in the channel form's data metric: with the patch
Gram ``G`` (``[K_c, K_c]``) the output error of a kernel ``W'`` is ``‖X (W − W')‖_F² = tr(ΔWᵀ G ΔW)``
(``ΔW`` ``[K_c, N]``); without statistics, ``‖ΔW‖_F``. Both forms have ``K·N = N·C·k_h·k_w`` parameters,
so a ratio keeps the same count in either: the channel form is truncated at its policy's rank ``r_c``
in the method's metric, the spatial form (data-free) at the largest ``r_s`` with
``r_s·(K_s + N_s) ≤ r_c·(K_c + N_c)``, and the smaller error wins. Under a ratio both ranks are the
policy's own, aligned and floored as the rewrite will take them: where either form stays dense at that
budget (its aligned rank under ``--min-rank``, or at break-even) the channel form is kept, so ``auto`` never
factorizes a weight that ``--conv channel`` keeps dense. Energy policies and ``--rank full`` are compared at
a ratio of 0.5, a fixed rank at its own parameter count; the report says which and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onnxsvd.calibrate.stats import Statistics
from onnxsvd.config import RewriteConfig
from onnxsvd.errors import FactorizationError
from onnxsvd.factorize import decompose, identity_metric, truncate
from onnxsvd.graph import GraphIndex, Match, Site, conv_matrix, conv_site_in_form, load_weight
from onnxsvd.pipeline.group import byte_cost, group_statistics, metric_for, svd_options, weight_groups
from onnxsvd.rank import choose_rank

__all__ = ["choose_conv_forms"]


def _budget(config: RewriteConfig, k: int, n: int) -> tuple[int, str]:
    """Parameters the channel form may keep, and how that was decided."""
    policy = config.policy
    if policy.kind == "ratio":
        return int(policy.value * k * n), f"ratio {policy.value:g}"
    if policy.kind == "rank":
        rank = min(int(policy.value), k, n)
        return rank * (k + n), f"rank {rank} of the channel form"
    return int(0.5 * k * n), f"ratio 0.5 (the {policy.kind} policy fixes no rank before the SVD)"


def _output_error(delta: np.ndarray, gram: np.ndarray | None) -> float:
    """``sqrt(tr(ΔWᵀ G ΔW))``, or ``‖ΔW‖_F`` without a Gram (``delta`` ``[K_c, N]``)."""
    if gram is None:
        return float(np.linalg.norm(delta))
    return float(np.sqrt(max(np.sum(delta * (gram @ delta)), 0.0)))  # [K_c, K_c]·[K_c, N]


def _choose(
    index: GraphIndex, sites: list[Site], config: RewriteConfig, statistics: Statistics | None, base_dir: str | None
) -> tuple[str, str]:
    """(form, note) for one group of Conv sites matched in the channel form."""
    site = sites[0]
    geometry = site.conv
    assert geometry is not None
    weight = load_weight(index, site, base_dir)  # [K_c, N]
    kernel = weight.T.reshape(geometry.out_channels, geometry.in_channels, *geometry.kernel)  # [N, C, k_h, k_w]
    k_c, n_c = geometry.shape_in("channel")
    k_s, n_s = geometry.shape_in("spatial")
    budget, how = _budget(config, k_c, n_c)
    rank_c = max(1, min(budget // (k_c + n_c), k_c, n_c))
    rank_s = max(1, min(budget // (k_s + n_s), k_s, n_s))
    if config.policy.kind == "ratio":  # the ranks the rewrite will take, aligned and floored, in each form
        channel_rank = choose_rank(config.policy, k_c, n_c, None, byte_cost(site, config))
        spatial_rank = choose_rank(config.policy, k_s, n_s, None, byte_cost(conv_site_in_form(site, "spatial"), config))
        for name, decision in (("channel", channel_rank), ("spatial", spatial_rank)):
            if decision.dense:
                return "channel", (
                    f"--conv auto: channel form (the {name} form stays dense at {how}: {decision.reason}; auto "
                    "factorizes no weight the channel form keeps dense)"
                )
        rank_c, rank_s = channel_rank.rank, spatial_rank.rank
    stats = group_statistics(sites, statistics)  # the patch Gram, whatever the method: the output error's metric
    gram = stats.gram if stats is not None else None
    metric = metric_for(config, stats) if config.method != "svd" and stats is not None else identity_metric()
    options = svd_options(config)
    channel = truncate(decompose(weight, metric, options=options), [rank_c], np.float64).product()  # [K_c, N]
    spatial_matrix = conv_matrix(kernel, "spatial")  # [K_s, N_s]
    spatial = truncate(decompose(spatial_matrix, identity_metric(), options=options), [rank_s], np.float64).product()
    k_h, k_w = geometry.kernel
    spatial_kernel = spatial.reshape(geometry.in_channels, k_h, k_w, geometry.out_channels)  # [C, k_h, k_w, N]
    spatial_as_channel = conv_matrix(spatial_kernel.transpose(3, 0, 1, 2), "channel")  # [K_c, N]
    scale = _output_error(weight, gram) or 1.0
    error_c = _output_error(weight - channel, gram) / scale
    error_s = _output_error(weight - spatial_as_channel, gram) / scale
    form = "spatial" if error_s < error_c else "channel"
    where = "in the data metric" if gram is not None else "data-free (no statistics)"
    note = (
        f"--conv auto: {form} form (relative output error {where}: channel {error_c:.4f} at rank {rank_c}, "
        f"spatial {error_s:.4f} at rank {rank_s}; compared at {how}: {rank_c * (k_c + n_c):,} and "
        f"{rank_s * (k_s + n_s):,} parameters)"
    )
    return form, note


def choose_conv_forms(
    match: Match,
    index: GraphIndex,
    config: RewriteConfig,
    statistics: Statistics | None = None,
    base_dir: str | None = None,
) -> Match:
    """Under ``--conv auto``, each Conv group where the spatial form applies in the form that keeps the
    smaller output error (its note says why); other sites as they are. Returns a new :class:`Match`."""
    if config.conv != "auto":
        return match
    chosen: dict[str, Site] = {}
    for sites in weight_groups(match.sites).values():
        geometry = sites[0].conv
        if geometry is None:
            continue
        if not geometry.spatial_applies:
            note = f"--conv auto: channel form (the spatial form needs k_h > 1 and k_w > 1; kernel {geometry.kernel})"
            form = "channel"
        else:
            try:
                form, note = _choose(index, sites, config, statistics, base_dir)
            except FactorizationError as error:
                form, note = "channel", f"--conv auto: channel form (the comparison failed: {error})"
        for site in sites:
            moved = conv_site_in_form(site, form) if form != "channel" else site
            chosen[site.name] = dataclasses.replace(moved, conv=dataclasses.replace(moved.conv, note=note))
    sites: Sequence[Site] = [chosen.get(site.name, site) for site in match.sites]
    return Match(sites=tuple(sites), skips=match.skips)
