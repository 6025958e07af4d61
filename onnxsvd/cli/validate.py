"""``onnxsvd validate``: parse → :class:`ValidateConfig` → :func:`validate` → rich tables (and JSON).

Errors are raised as
:class:`onnxsvd.errors.OnnxSvdError` for ``onnxsvd.cli.main`` to print as one line; a failed gate
renders the report (and writes the JSON) first, then raises :class:`ValidationGateError` (exit code 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from onnxsvd.cli.options import PROVIDER_LIST
from onnxsvd.cli.render import general, human_bytes, human_flops, number, progress_bar, stdout
from onnxsvd.config import VALIDATE_BATCH_SIZE, ValidateConfig

if TYPE_CHECKING:
    from onnxsvd.validate.report import ValidationReport

__all__ = ["validate_command", "parse_config", "render_report"]

_DEFAULTS = ValidateConfig()


def parse_config(options: Mapping[str, Any], rewrite_report: Path | None = None) -> ValidateConfig:
    """The command's configuration options, and the factorized sites that ``--rewrite-report`` names, as a
    :class:`ValidateConfig`.

    Every option of ``validate`` but the paths is a :class:`ValidateConfig` field of the same name, with
    the field's default: the option declarations are the one place that maps the command to the config,
    and ``options`` (click's keywords) goes in as it comes.

    Raises:
        UsageError: an option value that cannot work, or a rewrite report that cannot be read.
    """
    from onnxsvd.validate.pipeline import factorized_sites_from_report  # the library, when the command runs

    sites = factorized_sites_from_report(rewrite_report) if rewrite_report is not None else None
    return ValidateConfig(**options, factorized_sites=sites)


@click.command("validate")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("rewritten", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Evaluation data: an .npz keyed by input name (axis 0 = samples), or a folder of them.")
@click.option("--providers", type=PROVIDER_LIST, default=",".join(_DEFAULTS.providers), show_default=True,
              metavar="cpu,cuda",
              help="Execution providers to time; accuracy runs on the first.")
@click.option("--warmup", type=int, default=_DEFAULTS.warmup, show_default=True, help="Untimed runs of each model.")
@click.option("--iters", type=int, default=_DEFAULTS.iters, show_default=True,
              help="Timed runs of each model (alternating original, rewritten).")
@click.option("--threads", type=int, help="onnxruntime intra-op threads [default: onnxruntime's].")
@click.option("--batch-size", type=int,
              help=f"Samples per batch [default: one batch per file of a folder, else {VALIDATE_BATCH_SIZE}]; "
                   "latency is timed on the first batch.")
@click.option("--max-samples", type=int, help="Use at most this many samples.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--min-cosine", type=float, help="Gate: exit 3 when an output's mean cosine is below this.")
@click.option("--max-top1-drop", type=float,
              help="Gate: exit 3 when top-1 drops by more than this (accuracy against labels when the data "
                   "has them, else 1 − agreement).")
@click.option("--rewrite-report", type=click.Path(path_type=Path),
              help="The JSON of 'onnxsvd rewrite --report': names the factorized sites for the speedup bound "
                   "[default: inferred from node names].")
@click.option("--adapter", type=click.Path(path_type=Path),
              help="An ONNX Runtime adapter from 'onnxsvd extract', active on every run of REWRITTEN "
                   "(its base_lora.onnx).")
@click.option("--profile/--no-profile", default=_DEFAULTS.profile, show_default=True,
              help="Profile the original to compute the speedup bound.")
def validate_command(
    original: Path,
    rewritten: Path,
    data_path: Path,
    json_path: Path | None,
    rewrite_report: Path | None,
    adapter: Path | None,
    **options: Any,
) -> None:
    """Compare REWRITTEN with ORIGINAL on data: accuracy per output (cosine, SQNR, errors, top-1/top-5
    agreement, accuracy against labels), latency per provider (both models alternately; p50, p90,
    mean, throughput, speedup, and the speedup bound from a profile of the original), and size.

    With --min-cosine or --max-top1-drop it is a gate: the report is printed (and written), then the
    command exits with code 3 if the rewrite is outside it.
    """
    from onnxsvd import io
    from onnxsvd.validate.pipeline import validate

    if json_path is not None:
        io.check_outputs(
            {"--json": json_path},
            {"original": original, "rewritten": rewritten, "--data": data_path, "--rewrite-report": rewrite_report,
             "--adapter": adapter},
        )
        io.check_output_path(json_path, None, force=False)
    config = parse_config(options, rewrite_report)  # options: every option but the paths
    with progress_bar("validating") as update:
        report = validate(original, rewritten, data_path, config, progress=update, enforce_gate=False, adapter=adapter)
    if json_path is not None:
        report.write_json(json_path)
    render_report(report, stdout, gate_details=False)
    if json_path is not None:
        stdout.print(f"report: {json_path}")
    report.raise_for_gate()  # the failures, once: main prints them as the error line


def render_report(report: ValidationReport, console: Console, gate_details: bool = True) -> None:
    """Print the accuracy, latency and size tables of ``report``.

    With ``gate_details=False`` a failed gate is one word here, for a caller that raises
    :class:`ValidationGateError` next and so prints the failures once, in its error line.
    """
    batching = f"batches of {report.batch_size}" if report.batch_size else "one batch per file"
    active = f" with adapter {report.adapter}" if report.adapter else ""
    accuracy = Table(
        title=f"accuracy: {report.rewritten}{active} vs {report.original} — {report.samples} samples "
        f"({batching}, {report.accuracy_provider})"
    )
    columns = ["output", "shape", "cosine", "cos min", "cos global", "SQNR dB", "rel err", "max abs",
               "mean abs", "top-1 agree", "top-5 agree"]
    if report.has_labels:
        columns.append("accuracy")
    for column in columns:
        accuracy.add_column(column, justify="left" if column == "output" else "right")
    for output in report.outputs:
        row = [
            output.name,
            "×".join(str(dim) for dim in output.shape),
            number(output.cosine),
            number(output.cosine_min),
            number(output.cosine_global),
            number(output.sqnr_db, 2),
            general(output.relative),
            general(output.max_abs),
            general(output.mean_abs),
            number(output.top1_agreement),
            number(output.top5_agreement),
        ]
        if report.has_labels:
            row.append(
                f"{output.accuracy_original:.4f} → {output.accuracy_rewritten:.4f}"
                if output.accuracy_original is not None and output.accuracy_rewritten is not None
                else "-"
            )
        accuracy.add_row(*row)
    console.print(accuracy)

    if report.speed:
        first = report.speed[0].timing
        threads = first.threads if first.threads is not None else "default"
        latency = Table(
            title=f"latency (ms) on one batch of {first.batch_size}: {first.iters} runs each after {first.warmup} "
            f"warm-up, alternating; threads {threads}"
        )
        for column in ("provider", "model", "p50", "p10–p90", "mean", "samples/s", "session s", "speedup",
                       "speedup p10–p90", "bound"):
            latency.add_column(column, justify="left" if column in ("provider", "model") else "right")
        for speed in report.speed:
            timing = speed.timing
            bound = "-"
            if speed.bound is not None:
                bound = f"≤ {speed.bound:.2f}×" + (" *" if speed.exceeds_bound else "")
                if speed.time_share is not None:
                    low, high = speed.time_share.share_range
                    bound += f" (s={speed.time_share.share:.2f}, {low:.2f}–{high:.2f})"
            for model, stats, seconds, speedup, spread, bound_cell in (
                ("original", timing.original, timing.session_seconds_original, "", "", ""),
                ("rewritten", timing.rewritten, timing.session_seconds_rewritten, f"{timing.speedup:.2f}×",
                 f"{timing.speedup_p10:.2f}–{timing.speedup_p90:.2f}×", bound),
            ):
                latency.add_row(
                    speed.provider if model == "original" else "",
                    model,
                    f"{stats.p50_ms:.3f}",
                    f"{stats.p10_ms:.3f}–{stats.p90_ms:.3f}",
                    f"{stats.mean_ms:.3f}",
                    f"{stats.throughput:,.0f}",
                    f"{seconds:.3f}",
                    speedup,
                    spread,
                    bound_cell,
                )
        console.print(latency)

    size = Table(title="size")
    for column in ("", "original", "rewritten", "kept"):
        size.add_column(column, justify="left" if not column else "right")
    size.add_row("parameters", f"{report.size.params_original:,}", f"{report.size.params_rewritten:,}",
                 f"{report.size.params_kept:.1%}")
    size.add_row("file size", human_bytes(report.size.bytes_original), human_bytes(report.size.bytes_rewritten),
                 f"{report.size.bytes_kept:.1%}")
    if report.size.linear_bytes_original:
        size.add_row("MatMul/Gemm/Conv bytes as stored", f"{report.size.linear_bytes_original:,}",
                     f"{report.size.linear_bytes_rewritten:,}", f"{report.size.linear_bytes_kept:.1%}")
    flops = report.flops
    if flops.flops_before is not None:
        size.add_row(f"FLOPs of {len(flops.sites)} rewritten sites (batch)", human_flops(flops.flops_before),
                     human_flops(flops.flops_after), f"{flops.kept_fraction:.1%}")
    else:
        size.add_row(f"FLOPs of {len(flops.sites)} rewritten sites (per row)", human_flops(flops.per_row_before),
                     human_flops(flops.per_row_after), f"{flops.kept_fraction:.1%}")
    console.print(size)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.gate.checked:
        if report.gate.passed:
            console.print("gate: passed")
        elif gate_details:
            console.print("gate: FAILED — " + "; ".join(report.gate.failures))
        else:
            console.print("gate: FAILED (exit code 3; the failure is the error line on stderr)")
