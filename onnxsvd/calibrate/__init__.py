"""Calibration: data readers → ONNX Runtime with site activations exposed → streamed statistics.

``calibrate(model, data, config)`` returns :class:`Statistics` (per activation ``XᵀX``, ``Σ|x|``,
``max|x|``, rows) stamped with the model's fingerprint; ``Statistics.save``/``load`` keep them in an
``.npz`` that ``rewrite --stats`` reads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate.collect import collect, collect_groups, find_mask_input, specs_for_sites
from onnxsvd.calibrate.patches import DEFAULT_PATCH_ROWS
from onnxsvd.calibrate.stats import ActivationStats, Statistics, StatisticsWriter, StatsAccumulator, combine
from onnxsvd.config import Progress, check_provider_names
from onnxsvd.data import Batches, iter_batches, load_inputs
from onnxsvd.errors import UsageError
from onnxsvd.graph import find_sites

__all__ = [
    "ActivationStats",
    "CalibrateConfig",
    "Statistics",
    "StatisticsWriter",
    "StatsAccumulator",
    "batch_source",
    "calibrate",
    "calibrate_file",
    "calibrate_to_file",
    "combine",
]

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class CalibrateConfig:
    """How calibration data is read and run.

    Attributes:
        batch_size: samples per ONNX Runtime run.
        max_samples: read at most this many samples.
        providers: ONNX Runtime providers (``"cpu"``, ``"cuda"``).
        mask_input: ``"auto"`` (use an ``attention_mask``-like ``[B, S]`` input when the model has one),
            an input name, or ``None``: rows where the mask is 0 (padding) are left out of the statistics.
        group_bytes: cap on the activation bytes one run holds per batch; more activations run in groups.
        segment_bytes: for a model whose weights stay on disk (over 512 MB of external data), the weight
            bytes one ONNX Runtime session may hold: the model runs in segments of consecutive nodes
            (``None``: a quarter of its weights, at least 256 MiB).
        patch_rows: im2col patches kept per batch of each Conv input; past it positions are sampled
            (``None``: every patch).
        seed: seeds the sampling of patches.
    """

    batch_size: int = 32
    max_samples: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    mask_input: str | None = "auto"
    group_bytes: int = 1 << 30
    segment_bytes: int | None = None
    patch_rows: int | None = DEFAULT_PATCH_ROWS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patch_rows is not None and self.patch_rows < 1:
            raise UsageError(f"--patch-rows must be at least 1, got {self.patch_rows}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.segment_bytes is not None and self.segment_bytes < 1:
            raise UsageError(f"segment_bytes must be at least 1, got {self.segment_bytes}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max-samples must be at least 1, got {self.max_samples}")
        check_provider_names(self.providers)


def resolve_mask(model: onnx.ModelProto, config: CalibrateConfig) -> str | None:
    """The mask input to use, from ``config.mask_input``."""
    if config.mask_input == "auto":
        return find_mask_input(model)
    if config.mask_input is not None and config.mask_input not in {v.name for v in model.graph.input}:
        raise UsageError(f"mask input {config.mask_input!r} is not an input of the model")
    return config.mask_input


def batch_source(
    data_path: str | os.PathLike[str], model: onnx.ModelProto, config: CalibrateConfig
) -> tuple[Batches, int]:
    """Check the data against the model (before any work) and return a re-iterable batch factory.

    Returns:
        ``(batches, count)``: a callable giving a fresh iterator of input dicts, and how many batches.

    Raises:
        DataError: the data does not fit the model.
    """
    data = load_inputs(data_path, model, max_samples=config.max_samples)
    batch = data.fixed_batch or config.batch_size
    count = math.ceil(data.samples / batch)
    return (lambda: iter_batches(data, batch, drop_last=data.fixed_batch is not None)), count


def calibrate(
    model: onnx.ModelProto,
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    config: CalibrateConfig | None = None,
    progress: Progress | None = None,
    total_batches: int | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Statistics:
    """Collect the statistics of every site activation of ``model`` over the calibration batches."""
    config = config or CalibrateConfig()
    sites = find_sites(model).sites
    specs = specs_for_sites(sites, config.patch_rows, config.seed)
    mask = resolve_mask(model, config)
    if mask:
        log.info("leaving out rows where %r is 0 (padding)", mask)
    activations = collect(
        model,
        specs,
        batches,
        providers=config.providers,
        mask_input=mask,
        group_bytes=config.group_bytes,
        progress=progress,
        total_batches=total_batches,
        base_dir=str(base_dir) if base_dir is not None else None,
        segment_bytes=config.segment_bytes,
    )
    return Statistics(fingerprint=io.fingerprint(model, base_dir), activations=activations)


def calibrate_file(
    model_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    config: CalibrateConfig | None = None,
    progress: Progress | None = None,
) -> Statistics:
    """Load the model, check the data, collect statistics, and save them atomically to ``output``."""
    config = config or CalibrateConfig()
    if output is not None:
        io.check_outputs({"-o": output}, {"model": model_path, "--data": data_path})
        io.check_output_path(output, model_path, force=False)
    model = io.load_model(model_path)
    batches, count = batch_source(data_path, model, config)
    if output is None:
        return calibrate(
            model, batches, config, progress=progress, total_batches=count, base_dir=Path(model_path).parent
        )
    return calibrate_to_file(
        model, batches, output, config, progress=progress, total_batches=count, base_dir=Path(model_path).parent
    )


def calibrate_to_file(
    model: onnx.ModelProto,
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    output: str | os.PathLike[str],
    config: CalibrateConfig | None = None,
    progress: Progress | None = None,
    total_batches: int | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Statistics:
    """Like :func:`calibrate`, writing each group of activations to ``output`` as soon as it is collected
    (one group in memory), atomically; returns the file's statistics, loaded lazily."""
    config = config or CalibrateConfig()
    specs = specs_for_sites(find_sites(model).sites, config.patch_rows, config.seed)
    with StatisticsWriter(output, io.fingerprint(model, base_dir)) as writer:
        for group in collect_groups(
            model,
            specs,
            batches,
            providers=config.providers,
            mask_input=resolve_mask(model, config),
            group_bytes=config.group_bytes,
            progress=progress,
            total_batches=total_batches,
            base_dir=str(base_dir) if base_dir is not None else None,
            segment_bytes=config.segment_bytes,
        ):
            writer.add(group)
    return Statistics.load(output)
