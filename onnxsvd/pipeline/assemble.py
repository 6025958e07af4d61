"""From group outcomes to a rewritten model and its report: emit the factorized groups, list every site."""

from __future__ import annotations

import logging
import time

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.config import LOW_KEPT_ENERGY, VERSION, RewriteConfig
from onnxsvd.graph import EmitOptions, FactorTensors, Match, Site, conv_flops, emit
from onnxsvd.graph.records import SOURCE_FINGERPRINT_KEY
from onnxsvd.pipeline.group import GroupOutcome
from onnxsvd.pipeline.report import RewriteReport, SiteReport

__all__ = ["RewriteResult", "assemble", "emit_outcomes", "fallback_notes"]


log = logging.getLogger(__name__)


class RewriteResult:
    """The rewritten model and its report."""

    def __init__(self, model: onnx.ModelProto, report: RewriteReport) -> None:
        self.model = model
        self.report = report


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
                dense_bytes=member.dense_bytes,
                factor_bytes=io.dtype_bytes(outcome.storage, rank * (member.k + member.n)) if factorized else 0,
                kept_energy=outcome.kept_energy,
                weight_error=outcome.weight_error,
                shared_with=[n for n in names if n != member.name],
                seconds=outcome.seconds,
                dense_ms=outcome.dense_ms,
                factorized_ms=outcome.factorized_ms,
                speedup=outcome.speedup,
                speed_provider=outcome.speed_provider,
                notes=list(outcome.notes),
                rank_note=outcome.rank_note or None,
                sensitivity=outcome.sensitivity,
                sensitivity_estimated=outcome.sensitivity_estimated is not None,
                sensitivity_reason=outcome.sensitivity_estimated,
                **_conv_fields(member, rank if factorized else None),
            )
        )
    return reports


def _conv_fields(site: Site, rank: int | None) -> dict[str, object]:
    """A Conv site's form and multiply-adds per output position, dense and factorized."""
    if site.conv is None:
        return {}
    dense = conv_flops(site.conv, None)
    return {"conv_form": site.conv.form, "flops_before": dense, "flops_after": conv_flops(site.conv, rank)}


def fallback_notes(sites: list[SiteReport], shown: int = 4) -> list[str]:
    """One report note per distinct SVD fallback, naming the sites it happened at (the first ``shown``)."""
    at: dict[str, list[str]] = {}
    for site in sites:
        for note in site.notes:
            at.setdefault(note, []).append(site.name)
    lines = []
    for note, names in at.items():
        listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        lines.append(f"{note} — at {len(names)} site{'s' if len(names) > 1 else ''}: {listed}")
    return lines
def _summary_notes(outcomes: list[GroupOutcome], config: RewriteConfig) -> list[str]:
    """Notes on what the ranks did: sites kept at a low share of their energy, ranks the alignment or
    the floor rounded."""
    notes = []
    low = [o for o in outcomes if o.factorized and o.kept_energy is not None and o.kept_energy < LOW_KEPT_ENERGY]
    if low:
        names = ", ".join(f"{o.sites[0].name} ({o.kept_energy:.2f})" for o in low)
        notes.append(
            f"low kept energy: {len(low)} site{'s' if len(low) > 1 else ''} keep under {LOW_KEPT_ENERGY:.0%} of "
            f"Σσ² in their metric, expect a large error there: {names}; give them more rank or keep them dense "
            "(--exclude)"
        )
    rounded = [o for o in outcomes if o.factorized and o.rank_note]
    if rounded:
        examples = "; ".join(f"{o.sites[0].name}: {o.rank_note}" for o in rounded[:3])
        more = f"; and {len(rounded) - 3} more (each site's rank_note)" if len(rounded) > 3 else ""
        notes.append(
            f"rank rounding: the ranks of {len(rounded)} factorized site{'s' if len(rounded) > 1 else ''} are not "
            f"the policy's own (--align {config.policy.align}, --min-rank {config.policy.floor}, break-even): "
            f"{examples}{more}"
        )
    return notes


def emit_outcomes(
    model: onnx.ModelProto,
    outcomes: list[GroupOutcome],
    config: RewriteConfig,
    tensors: FactorTensors | None = None,
    source_fingerprint: str | None = None,
) -> onnx.ModelProto:
    """Emit every factorized group into ``model`` (mutated; node indices must be those matched).

    ``tensors`` holds the initializers of groups already prepared (their arrays dropped).
    ``source_fingerprint`` (:func:`onnxsvd.io.fingerprint` of the model that was rewritten) is stamped in
    the model's metadata as :data:`onnxsvd.graph.records.SOURCE_FINGERPRINT_KEY`.
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
    _stamp(model, config, source_fingerprint)
    return model


def assemble(
    model: onnx.ModelProto,
    match: Match,
    outcomes: list[GroupOutcome],
    config: RewriteConfig,
    params_before: int,
    started: float,
    tensors: FactorTensors | None = None,
    bytes_before: int | None = None,
    source_fingerprint: str | None = None,
) -> RewriteResult:
    """Emit the factorized groups into ``model`` (a private copy) and build the report.

    ``params_before`` and ``bytes_before`` are :func:`onnxsvd.io.count_parameters` and
    :func:`onnxsvd.io.count_bytes` of the model before any factor was added to it;
    ``source_fingerprint`` is :func:`onnxsvd.io.fingerprint` of that model (stamped in the metadata, so
    ``finetune`` can check its teacher).
    """
    # In graph order; a node holding a body comes before the skipped nodes inside it, in their order.
    reports: dict[tuple[int, int], SiteReport] = {}
    for outcome in outcomes:
        for site, report in zip(outcome.sites, _site_reports(outcome), strict=True):
            reports[(site.node_index, 0)] = report
    for order, skip in enumerate(match.skips, start=1):
        params = skip.params or (int(np.prod(skip.shape)) if skip.shape else 0)
        matmul = skip.kind == "matmul"  # only a MatMul/Gemm of the main graph has a [K, N] normal form
        reports[(skip.node_index, order)] = SiteReport(
            name=skip.name,
            op_type=skip.op_type,
            shape=list(skip.shape) if matmul and skip.shape and len(skip.shape) == 2 else None,
            action="kept",
            reason=skip.reason,
            params_before=params,
            params_after=params,
            dense_bytes=skip.dense_bytes,
        )
    emit_outcomes(model, outcomes, config, tensors, source_fingerprint)
    notes = _summary_notes(outcomes, config)
    if config.stages > 1:
        notes.append(
            "residual stages: with exact float factors they equal one SVD of the summed rank (Eckart–Young); "
            "they differ only through the rounding of earlier stages to the storage dtype"
        )
    report = RewriteReport(
        input=None,
        output=None,
        method=config.method,
        policy=(
            config.policy.describe(config.allocate)
            if config.stage_ranks is None
            else f"stage ranks {list(config.stage_ranks)}"
        ),
        layout=config.layout,
        stages=config.stages,
        params_before=params_before,
        params_after=io.count_parameters(model),
        bytes_before=bytes_before,
        bytes_after=io.count_bytes(model),
        sites=[reports[position] for position in sorted(reports)],
        seconds=time.perf_counter() - started,
        notes=notes,
    )
    report.notes.extend(fallback_notes(report.sites))
    log.info(
        "factorized %d of %d MatMul/Gemm nodes; parameters %d → %d; bytes %s → %d",
        len(report.factorized),
        len(report.sites),
        report.params_before,
        report.params_after,
        report.bytes_before,
        report.bytes_after,
    )
    return RewriteResult(model, report)


def _stamp(model: onnx.ModelProto, config: RewriteConfig, source_fingerprint: str | None) -> None:
    """Record what produced the model, and from which model, in its metadata (other entries are kept)."""
    entries = {
        "onnxsvd.version": VERSION,
        "onnxsvd.method": config.method,
        "onnxsvd.policy": config.policy.describe(config.allocate),
    }
    if source_fingerprint is not None:
        entries[SOURCE_FINGERPRINT_KEY] = source_fingerprint
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
