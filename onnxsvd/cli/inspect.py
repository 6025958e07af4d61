"""``onnxsvd inspect``: parse → :func:`onnxsvd.pipeline.inspect.inspect_model` → tables (or JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from onnxsvd.cli.options import selection_options
from onnxsvd.cli.render import stdout
from onnxsvd.config import RewriteConfig

__all__ = ["inspect_command"]


@click.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw the singular value spectra to this PNG.")
@selection_options
def inspect_command(
    model: Path, as_json: bool, plot: Path | None, include: str | None, exclude: str | None, min_params: int
) -> None:
    """Show every MatMul/Gemm site: shape, parameters, break-even rank, the ranks keeping 80/90/99% of
    the energy Σσ², and every node that would be skipped, with its reason."""
    from onnxsvd import io
    from onnxsvd.pipeline.inspect import inspect_model, plot_spectra

    config = RewriteConfig(include=include, exclude=exclude, min_params=min_params)
    if plot is not None:
        io.check_outputs({"--plot": plot}, {"model": model})
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
