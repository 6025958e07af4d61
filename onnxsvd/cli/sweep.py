"""``onnxsvd sweep``: parse → :class:`SweepConfig` → :func:`onnxsvd.sweep.sweep` → a rich table.

Errors are raised as
:class:`onnxsvd.errors.OnnxSvdError` for ``onnxsvd.cli.main`` to print as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from onnxsvd.cli.options import PROVIDER_LIST, CommaList, floor_options, selection_options
from onnxsvd.cli.render import progress_bar, stdout
from onnxsvd.config import LAYOUTS, STORAGE_DTYPES, RankPolicy, RewriteConfig

__all__ = ["sweep_command", "render_sweep"]

#: ``--ratios 0.3,0.5,0.7,0.9``.
RATIOS = CommaList(float, example="0.3,0.5,0.7,0.9")


@click.command("sweep")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Calibration data (.npz keyed by input name, axis 0 = samples, or a folder of them).")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Evaluation data [default: --data].")
@click.option("--ratios", type=RATIOS, default="0.3,0.5,0.7,0.9", show_default=True,
              help="Kept fractions of each layer's parameters.")
@click.option("--methods", default="svd,whiten", show_default=True,
              help="Comma-separated: svd, asvd, whiten, each optionally +sequential (e.g. whiten+sequential).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Folder for sweep.json, sweep.md, fidelity.png, speedup.png and models/.")
@click.option("--providers", type=PROVIDER_LIST, default="cpu", show_default=True, metavar="cpu,cuda",
              help="Execution providers to time; accuracy runs on the first.")
@click.option("--iters", type=int, default=20, show_default=True, help="Timed runs of each model.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs of each model.")
@click.option("--threads", type=int, help="onnxruntime intra-op threads for timing.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Calibration samples per run.")
@click.option("--max-samples", type=int, help="Use at most this many calibration samples.")
@click.option("--eval-batch-size", type=int, help="Evaluation samples per batch (the timed batch too).")
@click.option("--max-eval-samples", type=int, help="Use at most this many evaluation samples.")
@click.option("--align", type=int, default=8, show_default=True, help="Round ranks to a multiple of this.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="fused", show_default=True, help="Chain layout.")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="auto", show_default=True,
              help="Storage dtype of the factors.")
@click.option("--damping", type=float, default=1e-2, show_default=True, help="Whitening damping (relative).")
@click.option("--keep-dense-if-slower", is_flag=True,
              help="Time each site dense against factorized (first calibration batch) and keep the slower dense.")
@click.option("--baselines", metavar="int8,int4",
              help="Also run ONNX Runtime's quantizers on MODEL into the same table and plots: int8 "
                   "(quantize_dynamic, per channel), int4 (MatMulNBits RTN at blocks 32 and 128), int4-b32, "
                   "int4-b128.")
@selection_options
@floor_options
def sweep_command(
    model: Path,
    data_path: Path,
    eval_data: Path | None,
    ratios: tuple[float, ...],
    methods: str,
    output: Path,
    providers: tuple[str, ...],
    iters: int,
    warmup: int,
    threads: int | None,
    batch_size: int,
    max_samples: int | None,
    eval_batch_size: int | None,
    max_eval_samples: int | None,
    align: int,
    layout: str,
    dtype: str,
    damping: float,
    keep_dense_if_slower: bool,
    baselines: str | None,
    include: str | None,
    exclude: str | None,
    min_params: int,
    min_rank: int | None,
    min_share: float,
) -> None:
    """Rewrite MODEL at every ratio with every method, validate each against MODEL, and write the
    trade-off: sweep.json, sweep.md (a table), fidelity.png and speedup.png (against kept parameters,
    with the speedup bound), fidelity_bytes.png and fidelity_latency.png (every row, --baselines
    included). Calibrates once; the rewritten models go to OUTPUT/models/."""
    from onnxsvd.calibrate import CalibrateConfig
    from onnxsvd.pipeline.speed import SpeedCheckConfig
    from onnxsvd.quantize.baselines import parse_baselines
    from onnxsvd.sweep import SweepConfig, parse_methods, sweep

    provider_names = providers
    config = SweepConfig(
        ratios=ratios,
        methods=parse_methods(methods),
        rewrite=RewriteConfig(
            policy=RankPolicy(align=align, min_rank=min_rank), layout=layout, dtype=dtype, damping=damping,
            include=include, exclude=exclude, min_params=min_params, min_share=min_share,
        ),
        calibration=CalibrateConfig(batch_size=batch_size, max_samples=max_samples, providers=provider_names[:1]),
        providers=provider_names,
        warmup=warmup,
        iters=iters,
        threads=threads,
        batch_size=eval_batch_size,
        max_eval_samples=max_eval_samples,
        speed_check=SpeedCheckConfig(providers=provider_names, threads=threads) if keep_dense_if_slower else None,
        baselines=parse_baselines(baselines),
    )
    with progress_bar("sweep") as update:
        result = sweep(model, data_path, output, config, eval_data=eval_data, progress=update)
    render_sweep(result, stdout)


def render_sweep(result: Any, console: Console) -> None:
    """Print the sweep as a table (the columns of ``sweep.md``) and say where the files are."""
    from onnxsvd.sweep import summary_table  # the library, when the command runs

    header, rows, notes = summary_table(result)
    table = Table(title=f"sweep of {result.model} ({len(result.entries)} rewrites, {result.seconds:.0f} s)")
    for column in header:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in notes:
        console.print(note)
    for name, path in result.files.items():
        console.print(f"{name}: {path}")
