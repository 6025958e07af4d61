"""The ``onnxsvd`` command line: parse → config → library call → render. No logic of its own.

Errors are one line on stderr (``onnxsvd: error: …``) with exit code 2 for usage errors and 1 otherwise
(3 for a failed ``validate`` gate); ``--debug`` anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from onnxsvd.config import ALLOCATIONS, LAYOUTS, METHODS, STORAGE_DTYPES, SVD_SOLVERS, RankPolicy, RewriteConfig
from onnxsvd.errors import OnnxSvdError, UsageError

__all__ = ["cli", "main"]

stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False)


def _human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GB"


def _progress(description: str):
    """A transient rich progress bar on stderr; returns (context, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    task = bar.add_task(description, total=None, item="")

    def update(done: int, total: int, item: str) -> None:
        bar.update(task, completed=done, total=total, item=item)

    return bar, update


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="onnxsvd")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (allowed anywhere).")
def cli(verbose: int, debug: bool) -> None:
    """Shrink ONNX models: replace constant-weight MatMul/Gemm layers by SVD low-rank factor chains."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _selection_options(function: Any) -> Any:
    for option in reversed(
        [
            click.option("--include", metavar="REGEX", help="Only consider nodes whose name matches."),
            click.option("--exclude", metavar="REGEX", help="Keep nodes whose name matches dense."),
            click.option("--min-params", type=int, default=0, show_default=True, help="Keep smaller layers dense."),
        ]
    ):
        function = option(function)
    return function


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw the singular value spectra to this PNG.")
@_selection_options
def inspect(
    model: Path, as_json: bool, plot: Path | None, include: str | None, exclude: str | None, min_params: int
) -> None:
    """Show every MatMul/Gemm site: shape, parameters, break-even rank, the ranks keeping 80/90/99% of
    the energy Σσ², and every node that would be skipped, with its reason."""
    from onnxsvd import io
    from onnxsvd.analysis import inspect_model, plot_spectra

    config = RewriteConfig(include=include, exclude=exclude, min_params=min_params)
    if plot is not None:
        io.check_output_path(plot, model, force=False)
    loaded = io.load_model(model)
    inspection = inspect_model(loaded, config, base_dir=model.parent)
    if plot is not None:
        plot_spectra(inspection, plot)
    if as_json:
        click.echo(json.dumps(inspection.to_dict(), indent=2))
        return
    table = Table(title=f"{model} — {len(inspection.sites)} sites, {len(inspection.skips)} skipped")
    for column in ("site", "op", "K×N", "params", "break-even r", "r@80%", "r@90%", "r@99%", "note"):
        table.add_column(column, justify="right" if column not in ("site", "op", "note") else "left")
    for site in inspection.sites:
        ranks = site.energy_ranks
        note = site.note or (f"shared with {', '.join(site.shared_with)}" if site.shared_with else "")
        if site.weight_side == "left":
            note = (note + "; " if note else "") + "weight on the left"
        table.add_row(
            site.name,
            site.op_type,
            f"{site.shape[0]}×{site.shape[1]}",
            f"{site.params:,}",
            str(site.break_even_rank),
            str(ranks.get("0.8", "-")),
            str(ranks.get("0.9", "-")),
            str(ranks.get("0.99", "-")),
            note,
        )
    stdout.print(table)
    if inspection.skips:
        skipped = Table(title="skipped")
        for column in ("node", "op", "reason"):
            skipped.add_column(column)
        for skip in inspection.skips:
            skipped.add_row(skip.name, skip.op_type, skip.reason)
        stdout.print(skipped)
    share = inspection.params_in_sites / inspection.params_total if inspection.params_total else 0.0
    stdout.print(
        f"parameters: {inspection.params_total:,} in the model, {inspection.params_in_sites:,} "
        f"({share:.0%}) in factorizable sites"
    )
    if plot is not None:
        stdout.print(f"spectra plot: {plot}")


def _providers(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="An .npz keyed by the model's input names (axis 0 = samples), or a folder of them.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Statistics file to write.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per run.")
@click.option("--max-samples", type=int, help="Use at most this many samples.")
@click.option("--providers", default="cpu", show_default=True, help="ONNX Runtime providers: cpu or cuda.")
@click.option("--mask-input", default="auto", show_default=True,
              help="[B, S] input whose 0 entries mark padding rows to leave out ('auto', a name, or 'none').")
def calibrate(
    model: Path, data_path: Path, output: Path, batch_size: int, max_samples: int | None, providers: str,
    mask_input: str,
) -> None:
    """Collect activation statistics (XᵀX, mean and max |x| per channel) for activation-aware rewrites."""
    import time

    from onnxsvd.calibrate import CalibrateConfig, calibrate_file

    config = CalibrateConfig(
        batch_size=batch_size,
        max_samples=max_samples,
        providers=_providers(providers),
        mask_input=None if mask_input.lower() == "none" else mask_input,
    )
    started = time.perf_counter()
    bar, update = _progress("calibrating")
    with bar:
        statistics = calibrate_file(model, data_path, output, config, progress=update)
    rows = max((stats.rows for stats in statistics.activations.values()), default=0)
    stdout.print(
        f"statistics of {len(statistics.activations)} activations over {rows:,} rows "
        f"in {time.perf_counter() - started:.1f} s → {output} (model fingerprint {statistics.fingerprint})"
    )


def _policy(rank: int | None, ratio: float | None, energy: float | None, align: int, allow_growth: bool) -> RankPolicy:
    choices = (("rank", rank), ("ratio", ratio), ("energy", energy))
    given = [(kind, value) for kind, value in choices if value is not None]
    if len(given) > 1:
        raise UsageError("give only one of --rank, --ratio and --energy")
    kind, value = given[0] if given else ("ratio", 0.5)
    return RankPolicy(kind=kind, value=float(value), align=align, allow_growth=allow_growth)


def _stage_ranks(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise UsageError(f"--stage-ranks takes comma-separated integers such as 32,16, got {text!r}") from error


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the rewritten model.")
@click.option("--rank", type=int, help="Fixed rank for every layer.")
@click.option("--ratio", type=float, help="Kept fraction of each layer's parameters, 0 < ρ ≤ 1 [default: 0.5].")
@click.option("--energy", type=float, help="Smallest rank keeping this share of Σσ², 0 < β ≤ 1.")
@click.option("--align", type=int, default=8, show_default=True, help="Round ranks to a multiple of this.")
@click.option("--allow-growth", is_flag=True, help="Factorize even at or above the break-even rank.")
@click.option("--stages", type=int, default=1, show_default=True, help="Residual SVD stages.")
@click.option("--stage-ranks", metavar="R1,R2,…", help="Explicit rank of each stage (overrides the policy).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="fused", show_default=True,
              help="fused: two MatMuls; stages: one chain per stage, summed.")
@click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
              help="svd: plain; asvd: activation scaling; whiten: SVD-LLM whitening (need --stats or --data).")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="ASVD exponent α.")
@click.option("--damping", type=float, default=1e-2, show_default=True, help="Whitening damping (relative).")
@click.option("--ridge", type=float, default=5e-2, show_default=True,
              help="Sequential rewrite: pull the least-squares target towards the original weight (relative).")
@click.option("--stats", type=click.Path(path_type=Path), help="Calibration statistics from 'onnxsvd calibrate'.")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Calibration data (.npz or folder): calibrate in the same command.")
@click.option("--sequential", is_flag=True,
              help="Fit each level to the partly compressed model's own inputs (needs --data).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Calibration samples per run.")
@click.option("--max-samples", type=int, help="Use at most this many calibration samples.")
@click.option("--providers", default="cpu", show_default=True,
              help="ONNX Runtime providers for calibration and --keep-dense-if-slower: cpu or cuda.")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="auto", show_default=True,
              help="Storage dtype of the factors.")
@click.option("--keep-dense-if-slower", is_flag=True,
              help="Time each factorized site dense against factorized on --providers; keep dense the "
              "sites whose chain is not faster.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=d0,d1,…",
              help="Input shape for --keep-dense-if-slower timing (repeat per input; default: a --data batch).")
@click.option("--speed-iters", type=int, default=30, show_default=True,
              help="Timed runs of each form per site for --keep-dense-if-slower.")
@click.option("--threads", type=int, help="onnxruntime intra-op threads for --keep-dense-if-slower timing.")
@_selection_options
@click.option("--report", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--dry-run", is_flag=True, help="Plan and report, write no model.")
@click.option("--force", is_flag=True, help="Allow overwriting the input model.")
@click.option("--allocate", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True,
              help="uniform: each layer by the policy; global: one --ratio/--energy budget over all sites "
                   "(ranks by whitened discarded energy × measured sensitivity with --data).")
@click.option("--svd", "svd_solver", type=click.Choice(SVD_SOLVERS), default="auto", show_default=True,
              help="exact, randomized (range finder), or auto: randomized when the rank is well below min(K, N).")
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True,
              help="Where the SVDs run (cuda through torch).")
@click.option("--jobs", type=int, default=0, show_default=True,
              help="Weights factorized in parallel (0: from the cores).")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to <output>.data [default: when the input does, or above 2 GB].")
def rewrite(
    model: Path,
    output: Path | None,
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    align: int,
    allow_growth: bool,
    stages: int,
    stage_ranks: str | None,
    layout: str,
    method: str,
    alpha: float,
    damping: float,
    ridge: float,
    stats: Path | None,
    data_path: Path | None,
    sequential: bool,
    batch_size: int,
    max_samples: int | None,
    providers: str,
    dtype: str,
    keep_dense_if_slower: bool,
    shapes: tuple[str, ...],
    speed_iters: int,
    threads: int | None,
    include: str | None,
    exclude: str | None,
    min_params: int,
    report: Path | None,
    dry_run: bool,
    force: bool,
    external_data: bool | None,
    svd_solver: str,
    device: str,
    jobs: int,
    allocate: str,
) -> None:
    """Replace constant-weight MatMul/Gemm nodes by low-rank factor chains.

    The ratio ρ is the kept fraction of each layer's parameters: rank r = ⌊ρ·K·N/(K+N)⌋. A layer whose
    chain would not be smaller (r·(K+N) ≥ K·N) stays dense, with the reason in the report.
    """
    from onnxsvd import io
    from onnxsvd.calibrate import CalibrateConfig
    from onnxsvd.calibrate.stats import Statistics
    from onnxsvd.rewrite import rewrite_file

    config = RewriteConfig(
        policy=_policy(rank, ratio, energy, align, allow_growth),
        stages=stages,
        stage_ranks=_stage_ranks(stage_ranks),
        layout=layout,
        method=method,
        alpha=alpha,
        damping=damping,
        ridge=ridge,
        include=include,
        exclude=exclude,
        min_params=min_params,
        dtype=dtype,
        svd=svd_solver,
        device=device,
        jobs=jobs,
        allocate=allocate,
    )
    if device == "cuda":
        _require_torch_cuda()
    if output is None and not dry_run:
        raise UsageError("missing -o/--output: say where to write the rewritten model (or use --dry-run)")
    if report is not None:
        io.check_output_path(report, model, force=False)
        if output is not None and not dry_run and report.resolve() == output.resolve():
            raise UsageError("--report and -o name the same file; give the report its own path (e.g. report.json)")
    if output is not None and not dry_run:
        io.check_output_path(output, model, force)
    if sequential and data_path is None:
        raise UsageError("--sequential needs calibration data: pass --data DATA")
    if stats is not None and data_path is not None:
        raise UsageError("give either --stats or --data, not both")
    if config.needs_statistics and stats is None and data_path is None:
        raise UsageError(f"--method {method} needs calibration data: pass --stats stats.npz or --data DATA")
    calibration = CalibrateConfig(batch_size=batch_size, max_samples=max_samples, providers=_providers(providers))
    speed_check = _speed_check(keep_dense_if_slower, shapes, data_path, calibration.providers, speed_iters, threads)
    if data_path is not None:  # the providers run calibration: a missing one is one line now, not mid-run
        from onnxsvd.validate.site_speed import check_providers

        check_providers(calibration.providers)
    statistics = Statistics.load(stats) if stats is not None else None
    bar, update = _progress("factorizing")
    with bar:
        outcome = rewrite_file(
            model,
            None if dry_run else output,
            config,
            statistics,
            force=force,
            progress=update,
            data=data_path,
            calibration=calibration,
            sequential=sequential,
            external_data=external_data,
            speed_check=speed_check,
        )
    if report is not None:
        outcome.write_json(report)
    _render_rewrite(outcome)
    if report is not None:
        stdout.print(f"report: {report}")


def _speed_check(
    enabled: bool, shapes: tuple[str, ...], data_path: Path | None, providers: tuple[str, ...], iters: int,
    threads: int | None,
) -> Any:
    """The ``--keep-dense-if-slower`` configuration (providers checked now, before any work), or None."""
    if not enabled:
        if shapes:
            raise UsageError("--shape only sets the timing shapes of --keep-dense-if-slower; add that flag")
        return None
    from onnxsvd.validate.site_speed import SHAPE_HINT, SpeedCheckConfig, check_providers, parse_shape

    declared = dict(parse_shape(text) for text in shapes)
    if not declared and data_path is None:
        raise UsageError(SHAPE_HINT)
    config = SpeedCheckConfig(providers=providers, input_shapes=declared, iters=iters, threads=threads)
    check_providers(config.providers)
    return config


def _require_torch_cuda() -> None:
    from onnxsvd.errors import ProviderError

    try:
        import torch
    except ImportError as error:
        raise ProviderError("--device cuda needs torch: pip install 'onnxsvd[torch]'") from error
    if not torch.cuda.is_available():
        raise ProviderError("--device cuda: torch sees no CUDA GPU here; use --device cpu")


def _render_rewrite(report: Any) -> None:
    table = Table(title=f"{report.input} → {report.output or '(dry run, nothing written)'}")
    for column in ("site", "op", "K×N", "action", "rank", "params", "kept energy", "reason"):
        table.add_column(column, justify="right" if column in ("rank", "params", "kept energy") else "left")
    for site in report.sites:
        shape = f"{site.shape[0]}×{site.shape[1]}" if site.shape else "-"
        energy = f"{site.kept_energy:.3f}" if site.kept_energy is not None else "-"
        params = (
            f"{site.params_before:,} → {site.params_after:,}"
            if site.action == "factorized"
            else f"{site.params_before:,}"
        )
        table.add_row(
            site.name, site.op_type, shape, site.action, str(site.rank or "-"), params, energy, site.reason
        )
    stdout.print(table)
    ratio = report.params_after / report.params_before if report.params_before else 1.0
    stdout.print(
        f"method {report.method}, policy {report.policy}, layout {report.layout}\n"
        f"sites: {len(report.factorized)} factorized, {len(report.kept)} kept\n"
        f"parameters: {report.params_before:,} → {report.params_after:,} ({ratio:.1%} kept)\n"
        f"file size: {_human_bytes(report.file_size_before)} → {_human_bytes(report.file_size_after)}\n"
        f"time: {report.seconds:.2f} s"
    )
    for note in report.notes:
        stdout.print(f"note: {note}")


def _register() -> None:
    """Commands that live beside the library they drive, registered explicitly."""
    from onnxsvd.finetune.command import finetune_command
    from onnxsvd.validate.command import validate_command

    cli.add_command(validate_command)
    cli.add_command(finetune_command)
    from onnxsvd.sweep_command import sweep_command

    cli.add_command(sweep_command)


_register()


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnxsvd`` script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args = [arg for arg in args if arg != "--debug"]
        args.insert(0, "--debug")
    try:
        cli.main(args=args, prog_name="onnxsvd", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.UsageError as error:
        if debug:
            raise
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
        click.echo(f"onnxsvd: error: {_one_line(error.format_message())}{hint}", err=True)
        return 2
    except click.Abort:
        click.echo("onnxsvd: aborted", err=True)
        return 130
    except OnnxSvdError as error:
        if debug:
            raise
        click.echo(f"onnxsvd: error: {_one_line(str(error))}", err=True)
        return error.exit_code
    except KeyboardInterrupt:
        click.echo("onnxsvd: interrupted", err=True)
        return 130
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        click.echo(
            f"onnxsvd: internal error: {type(error).__name__}: {_one_line(str(error))} "
            "(re-run with --debug for the traceback and report it)",
            err=True,
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
