"""Rewriting files: check every path first, load, calibrate if asked, rewrite (one-shot or sequential),
check and save atomically, and report sizes. One :class:`RewriteJob` holds everything a run needs.

Library use::

    from onnxsvd import RewriteJob, rewrite_file
    report = rewrite_file(RewriteJob("model.onnx", "small.onnx", config, data="calib.npz"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import onnx

from onnxsvd import io
from onnxsvd.calibrate import CalibrateConfig, batch_source, calibrate, calibrate_to_file, resolve_mask
from onnxsvd.calibrate.stats import Statistics
from onnxsvd.config import Progress, RewriteConfig
from onnxsvd.errors import UsageError
from onnxsvd.pipeline import RewriteReport, RewriteResult, SpeedCheck, rewrite, rewrite_quantized, rewrite_sequential
from onnxsvd.pipeline.speed import SHAPE_HINT, SiteSpeedCheck, SpeedCheckConfig
from onnxsvd.validate.latency import check_providers

__all__ = ["RewriteJob", "rewrite_file", "nothing_factorized"]

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class RewriteJob:
    """One rewrite of a model file: what to read, what to write, and how.

    Attributes:
        model: the input model (never modified).
        output: where to write the rewritten model; ``None`` is a dry run (nothing written).
        config: the rewrite configuration.
        stats: a statistics file from ``onnxsvd calibrate`` (or give ``data``).
        data: calibration data (``.npz`` or folder): calibrate in the same run, checked before any work.
        calibration: how the data is read and run.
        sequential: fit each level to the partly compressed model's inputs (needs ``data``).
        external_data: write the weights to ``<output>.data`` (``None``: when the input keeps its weights
            in external data too, or the output would reach 2 GB).
        speed_check: time each factorized site dense against factorized and keep dense those whose chain
            is not faster (``--keep-dense-if-slower``); shapes from ``speed_check.input_shapes``, else from
            the first batch of ``data``.
        report: write the report as JSON here too.
        force: allow ``output`` to overwrite the input model (never the data, the statistics or the
            report).
        allow_unchanged: write the output even when no site is factorized (an unchanged copy of the
            input); without it such a rewrite is a :class:`UsageError` and nothing is written.
    """

    model: PathLike
    output: PathLike | None
    config: RewriteConfig = RewriteConfig()
    stats: PathLike | None = None
    data: PathLike | None = None
    calibration: CalibrateConfig = CalibrateConfig()
    sequential: bool = False
    external_data: bool | None = None
    speed_check: SpeedCheckConfig | None = None
    report: PathLike | None = None
    force: bool = False
    allow_unchanged: bool = False

    def __post_init__(self) -> None:
        if self.sequential and self.data is None:
            raise UsageError("--sequential needs calibration data: pass --data DATA")
        if self.stats is not None and self.data is not None:
            raise UsageError("give either --stats or --data, not both")
        if self.config.allocate == "global" and self.data is None:
            raise UsageError(
                "--allocate global measures each site's sensitivity by running calibration batches, which a "
                "statistics file does not hold: pass --data DATA (not --stats)"
            )
        if self.config.allocate == "global" and self.sequential:
            raise UsageError("--sequential does not allocate ranks globally: drop --allocate global or --sequential")
        if self.config.needs_statistics and self.stats is None and self.data is None:
            raise UsageError(
                f"--method {self.config.method} needs calibration data: pass --stats stats.npz or --data DATA"
            )
        if self.speed_check is not None and self.data is None and not self.speed_check.input_shapes:
            raise UsageError(SHAPE_HINT)

    def check_paths(self) -> None:
        """Refuse, before any work, outputs that are inputs, and outputs that cannot be written.

        Raises:
            OutputError: naming the path and what to do.
        """
        io.check_outputs(
            {"-o": self.output, "--report": self.report},
            {"model": self.model, "--stats": self.stats, "--data": self.data},
            forceable=("-o=model",),
            force=self.force,
        )
        if self.output is not None:
            io.check_output_path(self.output, self.model, self.force)
        if self.report is not None:
            io.check_output_path(self.report, None, False)


def rewrite_file(job: RewriteJob, progress: Progress | None = None) -> RewriteReport:
    """Run one :class:`RewriteJob`: check paths and providers, rewrite, check and save atomically.

    Args:
        job: what to read, write and how.
        progress: callback per weight (or per level with ``sequential``).

    Returns:
        The report (also written to ``job.report`` when given).

    Raises:
        ModelError: the input cannot be used.
        OutputError: an output cannot be written or is an input (checked before any work).
        DataError: the data does not fit the model.
        StatsError: the statistics are unreadable or of another model.
        UsageError: no site was factorized (see :func:`nothing_factorized`) and ``job.allow_unchanged``
            is not set; nothing is written.
    """
    job.check_paths()
    if job.speed_check is not None:
        check_providers(job.speed_check.providers)
    if job.data is not None:  # the providers run calibration: a missing one is one line now, not mid-run
        check_providers(job.calibration.providers)
    input_path = Path(job.model)
    statistics = Statistics.load(job.stats) if job.stats is not None else None
    model = io.load_model(input_path)
    output_path = Path(job.output) if job.output is not None else None
    external_data = job.external_data
    if output_path is not None and external_data is None:
        external_data = io.is_lazy(model) or any(True for _ in io.external_tensors(io.probe_model(input_path)))
    # Writing external data, the factors go straight to the output's data file as they are made (not
    # with a speed check or the sequential rewrite, which run the partly rewritten model).
    stream = output_path is not None and external_data and not job.sequential and job.speed_check is None
    with io.DataFile(output_path) if stream else contextlib.nullcontext() as data_file:
        rewritten = _rewrite_loaded(job, model, statistics, progress, data_file)
        unchanged = nothing_factorized(rewritten.report)
        if output_path is not None and unchanged is not None and not job.allow_unchanged:
            raise UsageError(
                f"nothing was factorized: {unchanged}; nothing written (pass --allow-unchanged to write the "
                "unchanged copy anyway)"
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
            _check_written(output_path)
        report.output = str(output_path)
        report.file_size_after = io.file_size(output_path)
    if job.report is not None:
        report.write_json(job.report)
    return report


#: What to change, by what kept the sites dense: (words of the reason, the option to change).
_UNCHANGED_FIXES = (
    ("--include", "an --include that matches (site names: 'onnxsvd inspect')"),
    ("--exclude", "a narrower --exclude"),
    ("--min-params", "a lower --min-params"),
    ("than dense", "no --keep-dense-if-slower"),
    ("--min-rank", "a lower --min-rank (or a larger --ratio)"),
    ("--min-share", "a lower --min-share"),
)
_RANK_FIX = "a smaller --rank/--ratio/--energy or --allow-growth"


def nothing_factorized(report: RewriteReport) -> str | None:
    """Why a rewrite factorized no site and what to change, in one line; ``None`` when it factorized some.

    The reasons the sites stayed dense are counted (``3× name does not match --include 'x'``) and each
    kind names the option that would change it; a model without any constant-weight MatMul/Gemm says so.
    """
    if report.factorized:
        return None
    sites = [site for site in report.sites if site.shape]
    if not sites:
        others = sorted({site.reason for site in report.sites})
        found = f" ({'; '.join(others)})" if others else ""
        return f"the model has no MatMul/Gemm with a constant weight{found}, so there is nothing to factorize"
    reasons: dict[str, int] = {}
    for site in sites:
        reasons[site.reason] = reasons.get(site.reason, 0) + 1
    listed = sorted(reasons.items(), key=lambda item: -item[1])
    why = "; ".join(f"{count}× {reason}" for reason, count in listed[:2])
    if len(listed) > 2:
        others = sum(count for _, count in listed[2:])
        why += f"; {others} more with other reasons (--dry-run lists every site)"
    fixes = [fix for words, fix in _UNCHANGED_FIXES if any(words in reason for reason in reasons)]
    if any(not any(words in reason for words, _ in _UNCHANGED_FIXES) for reason in reasons):
        fixes.append(_RANK_FIX)
    return f"all {len(sites)} sites stay dense ({why}); to factorize some, use {', or '.join(fixes)}"


def _rewrite_loaded(
    job: RewriteJob,
    model: onnx.ModelProto,
    statistics: Statistics | None,
    progress: Progress | None,
    data_file: io.DataFile | None,
) -> RewriteResult:
    """The rewrite step of :func:`rewrite_file`: calibrate if asked, then one-shot or sequential."""
    base_dir = Path(job.model).parent
    check = _site_speed_check(job, model, progress)
    if job.sequential and job.config.quantize is not None:
        if check is not None:
            raise UsageError("--keep-dense-if-slower does not time quantized sites yet: drop it with --quantize")
        batches, _ = batch_source(job.data, model, job.calibration)  # type: ignore[arg-type]
        return rewrite_quantized(
            model,
            job.config,
            batches=batches,
            sequential=True,
            providers=job.calibration.providers,
            mask_input=resolve_mask(model, job.calibration),
            base_dir=str(base_dir),
            progress=progress,
        )
    if job.sequential:
        batches, _ = batch_source(job.data, model, job.calibration)  # type: ignore[arg-type]
        return rewrite_sequential(
            model,
            job.config,
            batches,
            providers=job.calibration.providers,
            mask_input=resolve_mask(model, job.calibration),
            base_dir=str(base_dir),
            progress=progress,
            speed_check=check,
            patch_rows=job.calibration.patch_rows,
            seed=job.calibration.seed,
        )
    calibrate_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="onnxsvd-stats-") as scratch:
        if job.data is not None and job.config.needs_statistics:
            tick = time.perf_counter()
            batches, count = batch_source(job.data, model, job.calibration)
            if io.is_lazy(model):
                # A model too big to load: its statistics go to a file and are read one Gram at a time.
                statistics = calibrate_to_file(
                    model, batches, Path(scratch) / "stats.npz", job.calibration, total_batches=count,
                    base_dir=base_dir,
                )
            else:
                statistics = calibrate(model, batches, job.calibration, total_batches=count, base_dir=base_dir)
            calibrate_seconds = time.perf_counter() - tick
        allocation_batches = None
        if job.data is not None and job.config.allocate == "global":
            allocation_batches, _ = batch_source(job.data, model, job.calibration)
        result = rewrite(
            model,
            job.config,
            statistics,
            base_dir=base_dir,
            progress=progress,
            speed_check=check,
            batches=allocation_batches,
            data_file=data_file,
        )
    if calibrate_seconds:
        result.report.notes.append(f"calibration: {calibrate_seconds:.1f} s")
    return result


def _site_speed_check(job: RewriteJob, model: onnx.ModelProto, progress: Progress | None) -> SpeedCheck | None:
    """The ``--keep-dense-if-slower`` check, with the first calibration batch when no shapes are declared."""
    if job.speed_check is None:
        return None
    batch = None
    if not job.speed_check.input_shapes and job.data is not None:
        batches, _ = batch_source(job.data, model, job.calibration)
        batch = next(iter(batches()), None)
    return SiteSpeedCheck(job.speed_check, batch=batch, layout=job.config.layout, progress=progress)


def _check_written(output: Path) -> None:
    """Check a model written with external data by path (full check includes shape inference); remove it
    if it fails."""
    try:
        onnx.checker.check_model(str(output), full_check=True)  # by path: external data and > 2 GB work
    except Exception:
        for leftover in (output, output.parent / f"{output.name}.data"):
            leftover.unlink(missing_ok=True)
        raise
