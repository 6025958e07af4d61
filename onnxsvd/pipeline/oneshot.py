"""The one-shot pass: match → plan ranks → factorize → keep-dense checks → emit, on a model in memory.

``rewrite(model, config)`` never mutates its argument; :mod:`onnxsvd.files` adds loading, output checks,
atomic saving and file sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate.stats import Statistics
from onnxsvd.config import Progress, RewriteConfig
from onnxsvd.errors import FactorizationError, StatsError, UsageError
from onnxsvd.factorize import Metric, decompose, identity_metric
from onnxsvd.graph import FactorTensors, GraphIndex, Site, find_sites
from onnxsvd.pipeline.allocation import GlobalPlan, global_ranks
from onnxsvd.pipeline.assemble import RewriteResult, assemble
from onnxsvd.pipeline.conv_form import choose_conv_forms
from onnxsvd.pipeline.group import (
    GroupOutcome,
    SpeedCheck,
    factor_group,
    group_statistics,
    metric_for,
    sampling_notes,
    share_floor,
    svd_options,
    weight_groups,
)
from onnxsvd.pipeline.quantized import rewrite_quantized

__all__ = ["rewrite"]


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
            whose chain is not faster; see :class:`onnxsvd.pipeline.speed.SiteSpeedCheck`).
        batches: calibration batches (a callable giving a fresh iterable), used by ``allocate="global"``
            to measure each site's sensitivity (required by it).
        data_file: the output's :class:`onnxsvd.io.DataFile`: each factor is written there as soon as it is
            made (the returned model's factor initializers point at it), so no factor stays in memory;
            save the model with ``io.save_model(..., data_file=data_file)``. Not with ``speed_check``.

    Returns:
        The rewritten model and a report of every MatMul/Gemm.

    Raises:
        UsageError: an activation-aware method without statistics; global allocation without batches,
            or with a budget too small for the rank floors.
        StatsError: statistics of another model.
    """
    config = config or RewriteConfig()
    if config.quantize is not None:  # a quantized base with a low-rank correction of its error
        if speed_check is not None:
            raise UsageError("--keep-dense-if-slower does not time quantized sites yet: drop it with --quantize")
        return rewrite_quantized(
            model, config, statistics, base_dir=str(base_dir) if base_dir is not None else None,
            progress=progress, batches=batches, data_file=data_file,
        )
    started = time.perf_counter()
    if config.needs_statistics and statistics is None:
        raise UsageError(f"--method {config.method} needs calibration data: pass --stats stats.npz or --data DATA")
    source_fingerprint = io.fingerprint(model, base_dir)  # recorded in the output, checked against statistics
    if statistics is not None and statistics.fingerprint != source_fingerprint:
        raise StatsError(
            f"the statistics were collected on another model (fingerprint {statistics.fingerprint}, this "
            f"model's is {source_fingerprint}: another graph, attribute or weight values); "
            "re-run 'onnxsvd calibrate' on this model"
        )
    params_before, bytes_before = io.count_parameters(model), io.count_bytes(model)
    model = copy.deepcopy(model)
    match = find_sites(model, config)
    index = GraphIndex(model.graph)
    match = choose_conv_forms(match, index, config, statistics, str(base_dir) if base_dir is not None else None)
    groups = weight_groups(match.sites)

    def target(sites: list[Site], weight: np.ndarray) -> tuple[np.ndarray, Metric]:
        return weight, metric_for(config, group_statistics(sites, statistics))

    base = str(base_dir) if base_dir is not None else None
    # Without a speed check nothing needs the arrays after a group is done: its factors become
    # initializers at once and the arrays are dropped, so at most `jobs` weights are in memory.
    if data_file is not None and speed_check is not None:
        raise UsageError("a speed check needs the factors in memory: do not stream them to a data file")
    tensors = FactorTensors(model, data_file) if speed_check is None else None

    kept_dense = share_floor(groups, config)
    plan: GlobalPlan | None = None
    if config.allocate == "global":
        plan = global_ranks(model, groups, index, config, target, base, batches, progress, kept_dense)
        kept_dense = plan.dense
    notes: list[str] = _start_up(config) if groups else []
    if plan is not None:
        notes = plan.notes + notes

    def work(sites: list[Site]) -> GroupOutcome:
        key = sites[0].group
        override = plan.ranks.get(key) if plan is not None else None
        outcome = factor_group(
            index, sites, config, target, base, rank_override=override, keep_dense=kept_dense.get(key)
        )
        outcome.notes += sampling_notes(sites, statistics, config)
        if plan is not None and key in plan.sensitivities:
            outcome.sensitivity = plan.sensitivities[key]
            outcome.sensitivity_estimated = plan.estimated.get(key)
            if key in plan.rank_notes:
                outcome.rank_note = plan.rank_notes[key]
                outcome.reason += f" ({plan.rank_notes[key]})"
        return outcome

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
    result = assemble(model, match, outcomes, config, params_before, started, tensors, bytes_before=bytes_before,
                      source_fingerprint=source_fingerprint)
    result.report.notes.extend(notes)
    return result


#: A start-up shorter than this is not worth a note.
_START_UP_NOTE_SECONDS = 0.05


def _start_up(config: RewriteConfig) -> list[str]:
    """Pay the SVD backend's one-time start-up (importing torch, first-call set-up) outside every site.

    Measured on the ViT digits model, the first site's ``seconds`` held 1.5 s of importing torch and the
    others about 1 ms each; with this, each site's ``seconds`` is its own work. Returns the report's note
    (none when the start-up was negligible).
    """
    options = svd_options(config)
    tick = time.perf_counter()
    with contextlib.suppress(FactorizationError):  # every site's own SVD fails too, and reports why
        decompose(np.eye(2), identity_metric(), options=options)  # [2, 2]: the same backend as every site
    seconds = time.perf_counter() - tick
    if seconds < _START_UP_NOTE_SECONDS:
        return []
    return [
        f"start-up: {seconds:.2f} s for the {options.backend} SVD backend's first call (imports, set-up), "
        "not counted in any site's seconds"
    ]


def _bounded_map(pool: concurrent.futures.Executor, function: Callable, items: list, window: int):
    """``pool.map`` that submits at most ``window`` items ahead of the one being yielded."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
