"""``onnxsvd extract``: parse → :class:`~onnxsvd.pipeline.extract.ExtractConfig` →
:func:`~onnxsvd.pipeline.extract.extract` → a table of the deltas and the files written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from onnxsvd.cli.options import PROVIDER_LIST, rank_policy, selection_options
from onnxsvd.cli.render import human_bytes, number, progress_bar, stdout
from onnxsvd.config import ALLOCATIONS, FACTOR_DTYPES, METHODS, SVD_SOLVERS

if TYPE_CHECKING:
    from onnxsvd.pipeline.extract import ExtractReport

__all__ = ["extract_command", "render_extract"]

@click.command("extract")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("tuned", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Folder for base_lora.onnx, <tuned>.onnx_adapter, extract.json (made if missing).")
@click.option("--rank", type=int, help="Fixed rank of every delta [default: 16].")
@click.option("--ratio", type=float, help="Kept fraction of each site's parameters (with --allocate global: of all).")
@click.option("--energy", type=float, help="Smallest rank keeping this share of the delta's Σσ², 0 < β ≤ 1.")
@click.option("--align", type=int, default=1, show_default=True, help="Round ratio/energy ranks to a multiple of this.")
@click.option("--min-rank", type=int, help="Leave out a delta whose ratio or allocated rank is under this.")
@click.option("--stages", type=int, default=1, show_default=True, help="Residual SVD stages per delta.")
@click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
              help="svd: plain; whiten (or asvd): in the tuned model's activations on --data.")
@click.option("--damping", type=float, default=1e-2, show_default=True, help="Whitening damping (relative).")
@click.option("--data", "data_paths", multiple=True, type=click.Path(path_type=Path),
              help="Calibration data (.npz or folder) run through each tuned model: once for all, or once per "
                   "tuned model in order; implies --method whiten.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Calibration samples per run.")
@click.option("--max-samples", type=int, help="Use at most this many calibration samples.")
@click.option("--providers", type=PROVIDER_LIST, default="cpu", show_default=True, help="Providers for calibration.")
@click.option("--factor-dtype", type=click.Choice(FACTOR_DTYPES, case_sensitive=False), default="auto",
              show_default=True, help="Adapter factors: auto (the site's dtype), fp32 or fp16 (int8 is refused: "
              "an adapter feeds float factors).")
@click.option("--tolerance", type=float, default=1e-6, show_default=True,
              help="Leave out deltas with ‖ΔW‖/‖W_base‖ at or below this.")
@click.option("--allocate", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True,
              help="uniform: each delta by the policy; global: one --ratio/--energy budget per tuned model.")
@click.option("--svd", "svd_solver", type=click.Choice(SVD_SOLVERS), default="auto", show_default=True,
              help="exact, randomized, or auto.")
@click.option("--merge", is_flag=True, help="Also write <tuned>_merged.onnx: the base with the delta as constants.")
@selection_options
def extract_command(
    base: Path,
    tuned: tuple[Path, ...],
    output: Path,
    rank: int | None,
    ratio: float | None,
    energy: float | None,
    align: int,
    min_rank: int | None,
    stages: int,
    method: str,
    damping: float,
    data_paths: tuple[Path, ...],
    batch_size: int,
    max_samples: int | None,
    providers: tuple[str, ...],
    factor_dtype: str,
    tolerance: float,
    allocate: str,
    svd_solver: str,
    merge: bool,
    include: str | None,
    exclude: str | None,
    min_params: int,
) -> None:
    """Extract the low-rank delta W_tuned − W_base of each TUNED model as an ONNX Runtime adapter of BASE.

    Writes base_lora.onnx (BASE with a branch X·A·B per adapted site whose factors are graph inputs with
    rank-0 defaults), one <tuned>.onnx_adapter per TUNED model (activate it with
    RunOptions.add_active_adapter), extract.json, and with --merge <tuned>_merged.onnx.
    """
    from onnxsvd.calibrate import CalibrateConfig
    from onnxsvd.pipeline.extract import ExtractConfig, extract

    if rank is None and ratio is None and energy is None:
        rank = 16
    if data_paths and method == "svd":
        method = "whiten"
    config = ExtractConfig(
        policy=rank_policy(rank, ratio, energy, align, True, min_rank),
        stages=stages,
        method=method,
        damping=damping,
        factor_dtype=factor_dtype.lower(),
        tolerance=tolerance,
        allocate=allocate,
        merge=merge,
        include=include,
        exclude=exclude,
        min_params=min_params,
        svd=svd_solver,
        calibration=CalibrateConfig(batch_size=batch_size, max_samples=max_samples, providers=providers),
    )
    with progress_bar("extracting") as update:
        report = extract(base, list(tuned), output, config, data_path=list(data_paths) or None, progress=update)
    render_extract(report)


def render_extract(report: ExtractReport) -> None:
    """Print one table per tuned model and the files written."""
    for adapter in report.adapters:
        table = Table(title=f"{adapter.tuned} → {adapter.adapter}")
        for column in ("site", "K×N", "action", "rank", "‖ΔW‖/‖W‖", "kept energy", "delta error", "bytes", "reason"):
            table.add_column(column, justify="left" if column in ("site", "action", "reason") else "right")
        for delta in adapter.deltas:
            table.add_row(delta.name, f"{delta.k}×{delta.n}", delta.action, str(delta.rank or "-"),
                          f"{delta.delta_norm:.2e}", number(delta.kept_energy), number(delta.delta_error),
                          human_bytes(delta.adapter_bytes) if delta.adapter_bytes else "-", delta.reason)
        stdout.print(table)
        share = adapter.adapter_bytes / report.base_bytes if report.base_bytes else 0.0
        stdout.print(f"adapter: {adapter.adapter} ({human_bytes(adapter.adapter_bytes)}, {share:.2%} of the base "
                     f"model's {human_bytes(report.base_bytes)}); {len(adapter.adapted)} of {len(adapter.deltas)} "
                     "weight groups adapted")
        if adapter.changed_elsewhere:
            stdout.print(f"warning: {len(adapter.changed_elsewhere)} weights that are no site changed and are not in "
                         f"the adapter: {', '.join(adapter.changed_elsewhere[:8])}")
        if adapter.merged:
            stdout.print(f"merged: {adapter.merged} ({human_bytes(adapter.merged_bytes)})")
    stdout.print(f"adapter model: {report.base_lora} ({len(report.slots)} adapted sites, model version "
                 f"{report.model_version}); report: {Path(report.base_lora).parent / 'extract.json'}")
