"""``validate``: compare a rewritten model with its original on data — accuracy, latency, size, bound.

Order of work, cheapest checks first: providers available → both models load and have the same inputs
and outputs → data fits the model (headers only) → accuracy over every sample on the first provider →
gate usable → FLOPs → per provider: alternating timing on the first batch and a profile of the
original for the bound → sizes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.adapter import adapter_session, check_adapter, read_adapter
from onnxsvd.config import VALIDATE_BATCH_SIZE, Progress, ValidateConfig
from onnxsvd.data import LABELS_KEY, InputData, iter_batches, load_inputs, model_inputs
from onnxsvd.errors import DataError, ModelError, UsageError
from onnxsvd.graph.lora import lora_info
from onnxsvd.validate.latency import execution_provider, open_session, time_models
from onnxsvd.validate.metrics import MetricAccumulator, OutputMetrics
from onnxsvd.validate.profile import ProfileCache, site_flops, size_summary, speedup_bound
from onnxsvd.validate.report import ProviderSpeed, ValidationReport, check_gate

__all__ = ["validate", "compare_accuracy", "factorized_sites_from_report"]

log = logging.getLogger(__name__)


def factorized_sites_from_report(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The names of the sites a rewrite report (``onnxsvd rewrite --report``) marks ``factorized``.

    Raises:
        UsageError: the file is missing or is not a rewrite report.
    """
    path = Path(path)
    hint = "pass the JSON written by 'onnxsvd rewrite --report'"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UsageError(f"rewrite report not found: {path}; {hint}") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read the rewrite report {path} ({error}); {hint}") from error
    sites = data.get("sites") if isinstance(data, dict) else None
    if not isinstance(sites, list) or not all(isinstance(site, dict) and "name" in site for site in sites):
        raise UsageError(f"{path} is not a rewrite report (no 'sites' list); {hint}")
    return tuple(str(site["name"]) for site in sites if site.get("action") == "factorized")


def _check_interfaces(original: onnx.ModelProto, rewritten: onnx.ModelProto, rewritten_path: Path) -> None:
    inputs_a = sorted(spec.name for spec in model_inputs(original))
    inputs_b = sorted(spec.name for spec in model_inputs(rewritten))
    if inputs_a != inputs_b:
        raise ModelError(
            f"{rewritten_path} takes inputs {inputs_b} but the original takes {inputs_a}; "
            "validate a rewrite of this model"
        )
    outputs_a = [value.name for value in original.graph.output]
    outputs_b = {value.name for value in rewritten.graph.output}
    missing = [name for name in outputs_a if name not in outputs_b]
    if missing:
        raise ModelError(
            f"{rewritten_path} has no output {missing[0]!r} of the original; validate a rewrite of this model"
        )


def _batch_size(config: ValidateConfig, data: InputData) -> int | None:
    fixed = data.fixed_batch
    if fixed is not None:
        if config.batch_size is not None and config.batch_size != fixed:
            raise UsageError(
                f"the model fixes the batch size to {fixed} (axis 0 of its inputs); use --batch-size {fixed} "
                "or leave it out"
            )
        if data.samples < fixed:
            raise DataError(f"the model takes batches of exactly {fixed} samples but {data.path} has {data.samples}")
        return fixed
    if config.batch_size is not None:
        return config.batch_size
    return None if data.is_folder else VALIDATE_BATCH_SIZE


def _run(session: Any, names: list[str], feeds: dict[str, np.ndarray], which: str) -> list[np.ndarray]:
    try:
        return session.run(names, feeds)
    except Exception as error:  # onnxruntime's pybind errors are plain Exceptions
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"onnxruntime failed to run the {which} model on the data: {first}") from error


def _check_adapter(rewritten: onnx.ModelProto, rewritten_path: Path, adapter_path: Path) -> None:
    """Refuse an adapter that is not for this adapter model (another base, other inputs or shapes)."""
    info = lora_info(rewritten, str(rewritten_path))
    inputs: dict[str, tuple[int, int, int]] = {}
    for slot in info.slots:
        inputs[slot.a_name] = (slot.dtype, slot.k, 0)
        inputs[slot.b_name] = (slot.dtype, 0, slot.n)
    adapter = read_adapter(adapter_path)
    check_adapter(adapter, info.model_version, inputs, str(rewritten_path))
    for slot in info.slots:
        given = [name in adapter.values for name in (slot.a_name, slot.b_name)]
        if any(given) and not all(given):
            raise ModelError(
                f"adapter {adapter_path} sets only one of {slot.a_name!r} and {slot.b_name!r}; ONNX Runtime would pair "
                "it with the other's rank-0 default: give both factors of each site"
            )


def _sessions(
    original_path: Path,
    rewritten_path: Path,
    provider: str,
    config: ValidateConfig,
    adapter: str | os.PathLike[str] | None,
) -> tuple[tuple[Any, float], tuple[Any, float]]:
    """Sessions of both models on ``provider``; the rewritten one with ``adapter`` active on every run."""
    original = open_session(original_path, provider, config.threads)
    session, seconds = open_session(rewritten_path, provider, config.threads)
    if adapter is not None:
        session = adapter_session(session, adapter)
    return original, (session, seconds)


def compare_accuracy(
    original_session: Any,
    rewritten_session: Any,
    data: InputData,
    batch_size: int | None,
    progress: Progress | None = None,
) -> tuple[list[OutputMetrics], dict[str, np.ndarray] | None, int]:
    """Run both sessions over every sample and compare each output of the original with the rewritten.

    Returns:
        The metrics per output (in the original's output order), the first batch (for timing) and the
        number of samples compared.
    """
    names = [output.name for output in original_session.get_outputs()]
    accumulators = {name: MetricAccumulator(name) for name in names}
    fixed = data.fixed_batch is not None
    total = math.ceil(data.samples / batch_size) if batch_size else len([n for n in data.file_samples if n])
    first: dict[str, np.ndarray] | None = None
    samples = 0
    for done, batch in enumerate(iter_batches(data, batch_size, with_labels=True, drop_last=fixed), start=1):
        labels = batch.pop(LABELS_KEY, None)  # [B]
        if first is None:
            first = batch
        samples += len(next(iter(batch.values()))) if batch else 0
        reference = _run(original_session, names, batch, "original")
        candidate = _run(rewritten_session, names, batch, "rewritten")
        for name, a, b in zip(names, reference, candidate, strict=True):
            try:
                accumulators[name].update(a, b, labels)
            except ValueError as error:
                raise ModelError(f"{error}; validate a rewrite of this model") from error
        if progress is not None:
            progress(done, total, "accuracy")
    return [accumulators[name].result() for name in names], first, samples


def validate(
    original_path: str | os.PathLike[str],
    rewritten_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    config: ValidateConfig | None = None,
    *,
    progress: Progress | None = None,
    enforce_gate: bool = True,
    profiles: ProfileCache | None = None,
    adapter: str | os.PathLike[str] | None = None,
) -> ValidationReport:
    """Compare ``rewritten_path`` with ``original_path`` on the data at ``data_path``.

    Accuracy is computed over every sample (batched) on the first provider; latency on the first batch
    on every provider, both models alternately; the speedup bound from a profile of the original.

    Args:
        original_path: the original model.
        rewritten_path: the rewritten model.
        data_path: an ``.npz`` or a folder of ``.npz`` files (see :func:`onnxsvd.data.load_inputs`).
        config: providers, timing, batching, gate (defaults: CPU, 5 warm-up and 20 timed runs).
        progress: optional callback ``(done, total, stage)``.
        enforce_gate: raise when the gate fails (the CLI renders the report first, then raises).
        profiles: profiles of originals already measured, reused when the model file, provider, threads
            and batch shapes match (a sweep passes one cache to every validation); new ones are added.
        adapter: an ONNX Runtime adapter (``.onnx_adapter`` from ``onnxsvd extract``) active on every run of
            the rewritten model, which must be the adapter model it was extracted for (``base_lora.onnx``).

    Returns:
        The report.

    Raises:
        ProviderError: a provider is not available (checked before any work).
        ModelError: a model cannot be loaded or does not match the other's inputs and outputs.
        DataError: the data does not fit the model.
        UsageError: an impossible option (a batch size the model does not take, a top-1 gate without
            class scores).
        ValidationGateError: the gate failed (only with ``enforce_gate``).
    """
    config = config or ValidateConfig()
    started = time.perf_counter()
    original_path, rewritten_path, data_path = Path(original_path), Path(rewritten_path), Path(data_path)
    for provider in config.providers:
        execution_provider(provider)
    original = io.load_model(original_path)
    rewritten = io.load_model(rewritten_path)
    _check_interfaces(original, rewritten, rewritten_path)
    if adapter is not None:
        _check_adapter(rewritten, rewritten_path, Path(adapter))
    data = load_inputs(data_path, original, config.max_samples)
    batch_size = _batch_size(config, data)
    notes: list[str] = []

    first_provider = config.providers[0]
    sessions = {first_provider: _sessions(original_path, rewritten_path, first_provider, config, adapter)}
    (session_a, _), (session_b, _) = sessions[first_provider]
    outputs, first_batch, samples = compare_accuracy(session_a, session_b, data, batch_size, progress)
    if first_batch is None:
        raise DataError(f"{data_path} gave no batch to run; check --max-samples and --batch-size")
    gate = check_gate(outputs, config)
    for output in outputs:
        if output.non_finite:
            notes.append(f"output {output.name!r} of the rewritten model has {output.non_finite} NaN/Inf values")

    flops = site_flops(original, rewritten, config.factorized_sites)
    if not flops.sites:
        notes.append("no rewritten MatMul/Gemm/Conv sites found: the bound is 1")
    elif flops.source == "inferred":
        notes.append(
            f"rewritten sites inferred from node names ({len(flops.sites)} original MatMul/Gemm/Conv nodes are gone); "
            "pass the rewrite report to name them"
        )
    speed: list[ProviderSpeed] = []
    profiles = profiles if profiles is not None else ProfileCache()
    for done, provider in enumerate(config.providers, start=1):
        timing = time_models(
            original_path, rewritten_path, first_batch, provider, config.warmup, config.iters, config.threads,
            sessions=sessions.pop(provider, None)
            or _sessions(original_path, rewritten_path, provider, config, adapter),
        )
        share = bound = None
        if config.profile and flops.sites:
            profile = profiles.get(
                original_path, first_batch, provider, config.threads, config.profile_runs, config.warmup
            )
            share = profile.time_share(flops.sites)
            if share.rows and flops.flops_before is None:
                flops = flops.with_rows(share.rows)
            bound = speedup_bound(share.share, flops.kept_fraction)
            if share.missing:
                notes.append(
                    f"{provider}: {len(share.missing)} rewritten sites have no kernel of their own in the profile "
                    "(fused by onnxruntime); the bound counts only the others"
                )
        elif config.profile:
            bound = 1.0
        speed.append(ProviderSpeed(timing, share, bound))
        note = speed[-1].bound_note()
        if note is not None:
            notes.append(note)
        if progress is not None:
            progress(done, len(config.providers), "latency")
    size = size_summary(original_path, rewritten_path, original, rewritten)
    if flops.flops_before is None and flops.sites:
        notes.append("FLOPs are per row of activation (no profile gave the rows)")

    report = ValidationReport(
        original=str(original_path),
        rewritten=str(rewritten_path),
        data=str(data_path),
        samples=samples,
        batch_size=batch_size,
        has_labels=data.has_labels,
        accuracy_provider=first_provider,
        outputs=outputs,
        speed=speed,
        flops=flops,
        size=size,
        config=config,
        gate=gate,
        notes=notes,
        seconds=time.perf_counter() - started,
        adapter=str(adapter) if adapter is not None else None,
    )
    log.info(
        "validated %s against %s on %d samples: worst cosine %.4f",
        rewritten_path, original_path, report.samples, min((o.cosine for o in outputs), default=math.nan),
    )
    if enforce_gate:
        report.raise_for_gate()
    return report
