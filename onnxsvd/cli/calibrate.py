"""``onnxsvd calibrate``: parse → :class:`CalibrateConfig` → :func:`onnxsvd.calibrate.calibrate_file` → summary."""

from __future__ import annotations

import time
from pathlib import Path

import click

from onnxsvd.cli.options import PROVIDER_LIST
from onnxsvd.cli.render import progress_bar, stdout

__all__ = ["calibrate_command"]


@click.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="An .npz keyed by the model's input names (axis 0 = samples), or a folder of them.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Statistics file to write.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per run.")
@click.option("--max-samples", type=int, help="Use at most this many samples.")
@click.option("--providers", type=PROVIDER_LIST, default="cpu", show_default=True,
              help="ONNX Runtime providers: cpu or cuda.")
@click.option("--mask-input", default="auto", show_default=True,
              help="[B, S] input whose 0 entries mark padding rows to leave out ('auto', a name, or 'none').")
@click.option("--patch-rows", type=int, default=8192, show_default=True,
              help="im2col patches kept per batch of each Conv input; more positions are sampled (seeded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the patch sampling.")
def calibrate_command(
    model: Path, data_path: Path, output: Path, batch_size: int, max_samples: int | None,
    providers: tuple[str, ...], mask_input: str, patch_rows: int, seed: int,
) -> None:
    """Collect activation statistics (XᵀX, mean and max |x| per channel) for activation-aware rewrites."""
    from onnxsvd.calibrate import CalibrateConfig, calibrate_file

    config = CalibrateConfig(
        batch_size=batch_size,
        max_samples=max_samples,
        providers=providers,
        mask_input=None if mask_input.lower() == "none" else mask_input,
        patch_rows=patch_rows,
        seed=seed,
    )
    started = time.perf_counter()
    with progress_bar("calibrating") as update:
        statistics = calibrate_file(model, data_path, output, config, progress=update)
    rows = max((stats.rows for stats in statistics.activations.values()), default=0)
    stdout.print(
        f"statistics of {len(statistics.activations)} activations over {rows:,} rows "
        f"in {time.perf_counter() - started:.1f} s → {output} (model fingerprint {statistics.fingerprint})"
    )
