"""``onnxsvd inspect``: parse → :func:`onnxsvd.pipeline.inspect.inspect_model` → tables (or JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from onnxsvd.cli.options import selection_options
from onnxsvd.cli.render import NARROW, add_name_column, stdout
from onnxsvd.config import RewriteConfig

__all__ = ["inspect_command"]


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Draw the singular value spectra to this file (.png, .pdf or .svg).")
@selection_options
def inspect_command(
    model: Path, as_json: bool, plot: Path | None, include: str | None, exclude: str | None, min_params: int
) -> None:
    """Show every MatMul/Gemm site: shape, parameters, break-even rank, the ranks keeping 80/90/99% of
    the energy Σσ², and every node that would be skipped, with its reason: MatMul/Gemm nodes that are not
    sites, other nodes holding constant weights (LSTM, Conv, MatMulInteger…) and those inside If/Loop/Scan
    bodies."""
    from onnxsvd import io
    from onnxsvd.pipeline.inspect import inspect_model, plot_format, plot_spectra

    config = RewriteConfig(include=include, exclude=exclude, min_params=min_params)
    if plot is not None:
        io.check_outputs({"--plot": plot}, {"model": model})
        io.check_output_path(plot, model, force=False)
        plot_format(plot)  # the suffix names the format: refuse others before any work
    loaded = io.load_model(model)
    inspection = inspect_model(loaded, config, base_dir=model.parent)
    if plot is not None:
        plot_spectra(inspection, plot)
    if as_json:
        click.echo(json.dumps(inspection.to_dict(), indent=2))
        return
    narrow = stdout.width < NARROW
    # A narrow console gets the three energy ranks in one column and no op column.
    rank_columns = ["r@80/90/99%"] if narrow else ["r@80%", "r@90%", "r@99%"]
    table = Table(title=f"{model} — {len(inspection.sites)} sites, {len(inspection.skips)} skipped")
    add_name_column(table, "site", [site.name for site in inspection.sites], stdout)
    for column in ([] if narrow else ["op"]) + ["K×N", "params", "break-even r", *rank_columns]:
        table.add_column(column, justify="left" if column == "op" else "right")
    table.add_column("note", overflow="fold")
    for site in inspection.sites:
        ranks = [str(site.energy_ranks.get(level, "-")) for level in ("0.8", "0.9", "0.99")]
        note = site.note or (f"shared with {', '.join(site.shared_with)}" if site.shared_with else "")
        if site.weight_side == "left":
            note = (note + "; " if note else "") + "weight on the left"
        if site.scope:
            note = (note + "; " if note else "") + f"inside {site.scope} (not calibrated: plain SVD)"
        table.add_row(
            site.name,
            *([] if narrow else [site.op_type]),
            f"{site.shape[0]}×{site.shape[1]}",
            f"{site.params:,}",
            str(site.break_even_rank),
            *(["/".join(ranks)] if narrow else ranks),
            note,
        )
    stdout.print(table)
    if narrow:
        stdout.print(f"(column op left out to fit {stdout.width} columns; --json has every field)")
    if inspection.skips:
        skipped = Table(title="skipped")
        add_name_column(skipped, "node", [skip.name for skip in inspection.skips], stdout)
        skipped.add_column("op")
        skipped.add_column("params", justify="right")
        skipped.add_column("reason", overflow="fold")
        for skip in inspection.skips:
            skipped.add_row(skip.name, skip.op_type, f"{skip.params:,}" if skip.params else "-", skip.reason)
        stdout.print(skipped)
    total = inspection.params_total
    share = inspection.params_in_sites / total if total else 0.0
    line = f"parameters: {total:,} in the model, {inspection.params_in_sites:,} ({share:.0%}) in factorizable sites"
    if inspection.params_in_skipped:
        line += (
            f", {inspection.params_in_skipped:,} ({inspection.params_in_skipped / total if total else 0.0:.0%}) "
            "in weights that only skipped nodes read"
        )
    stdout.print(line)
    if plot is not None:
        stdout.print(f"spectra plot: {plot}")
