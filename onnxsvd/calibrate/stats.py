"""Streaming activation statistics: per activation, in float64, ``XᵀX``, ``Σ|x|``, ``max|x|`` and rows.

Legend: T rows (all leading dimensions of one batch flattened), K channels.

Statistics are keyed by the activation tensor's name, so sites that read the same activation (Q, K and
V projections) share one entry. A statistics file records the fingerprint of the model it came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from scipy.linalg import blas

from onnxsvd.errors import StatsError

__all__ = ["ActivationStats", "Statistics", "StatsAccumulator", "combine"]

_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Statistics of one activation ``X`` ``[T, K]`` over all calibration rows.

    Attributes:
        gram: ``[K, K]`` ``XᵀX``.
        abs_sum: ``[K]`` ``Σ_t |x_tk|``.
        abs_max: ``[K]`` ``max_t |x_tk|``.
        rows: ``T``.
    """

    gram: np.ndarray
    abs_sum: np.ndarray
    abs_max: np.ndarray
    rows: int

    @property
    def channels(self) -> int:
        return int(self.abs_sum.shape[0])

    @property
    def mean_abs(self) -> np.ndarray:
        """``[K]`` per-channel ``mean |x|``."""
        return self.abs_sum / max(self.rows, 1)


def combine(parts: Iterable[ActivationStats]) -> ActivationStats:
    """Statistics of the rows of several activations stacked (a weight read by two activations)."""
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    return ActivationStats(
        gram=sum(p.gram for p in parts),  # [K, K]
        abs_sum=sum(p.abs_sum for p in parts),  # [K]
        abs_max=np.max(np.stack([p.abs_max for p in parts]), axis=0),  # [K]
        rows=sum(p.rows for p in parts),
    )


class StatsAccumulator:
    """Accumulates one activation's statistics batch by batch, in float64, holding nothing but sums."""

    def __init__(self, channels: int) -> None:
        # Upper triangle only, Fortran order, so BLAS syrk adds XᵀX in place at half a GEMM's cost.
        self.gram = np.zeros((channels, channels), dtype=np.float64, order="F")  # [K, K]
        self.abs_sum = np.zeros(channels, dtype=np.float64)  # [K]
        self.abs_max = np.zeros(channels, dtype=np.float64)  # [K]
        self.rows = 0

    def update(self, batch: np.ndarray) -> None:
        """Add a batch ``[..., K]`` (all leading dimensions are rows)."""
        rows = np.asarray(batch).reshape(-1, self.abs_sum.shape[0]).astype(np.float64)  # [T, K]
        if rows.shape[0]:
            # rows.T is Fortran-contiguous [K, T]: syrk computes (rowsᵀ)(rowsᵀ)ᵀ = XᵀX into the upper triangle.
            self.gram = blas.dsyrk(1.0, rows.T, beta=1.0, c=self.gram, trans=0, lower=0, overwrite_c=1)
        magnitude = np.abs(rows)  # [T, K]
        self.abs_sum += magnitude.sum(axis=0)  # [K]
        if rows.shape[0]:
            np.maximum(self.abs_max, magnitude.max(axis=0), out=self.abs_max)  # [K]
        self.rows += rows.shape[0]

    def result(self) -> ActivationStats:
        upper = np.triu(self.gram)  # [K, K]
        gram = upper + np.triu(upper, 1).T  # symmetric XᵀX: [K, K]
        return ActivationStats(np.ascontiguousarray(gram), self.abs_sum.copy(), self.abs_max.copy(), self.rows)


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Statistics of every calibrated activation of one model.

    Attributes:
        fingerprint: :func:`onnxsvd.io.fingerprint` of the model they were collected on.
        activations: per activation tensor name.
    """

    fingerprint: str
    activations: Mapping[str, ActivationStats]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` atomically."""
        from onnxsvd.io import atomic_path

        arrays: dict[str, np.ndarray] = {
            "__format__": np.array(_FORMAT_VERSION),
            "__fingerprint__": np.array(self.fingerprint),
            "__names__": np.array(list(self.activations), dtype=object).astype(str),
        }
        for position, stats in enumerate(self.activations.values()):
            arrays[f"gram_{position}"] = stats.gram
            arrays[f"abs_sum_{position}"] = stats.abs_sum
            arrays[f"abs_max_{position}"] = stats.abs_max
            arrays[f"rows_{position}"] = np.array(stats.rows)
        path = Path(path)
        with atomic_path(path, suffix=".npz") as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Statistics:
        """Read a file written by :meth:`save`.

        Raises:
            StatsError: missing, unreadable, or not an onnxsvd statistics file.
        """
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"statistics file not found: {path}; run 'onnxsvd calibrate' to make one")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "__fingerprint__" not in data.files:
                    raise StatsError(f"{path} is not an onnxsvd statistics file; make one with 'onnxsvd calibrate'")
                names = [str(name) for name in data["__names__"]]
                activations = {
                    name: ActivationStats(
                        gram=data[f"gram_{i}"],
                        abs_sum=data[f"abs_sum_{i}"],
                        abs_max=data[f"abs_max_{i}"],
                        rows=int(data[f"rows_{i}"]),
                    )
                    for i, name in enumerate(names)
                }
                return cls(fingerprint=str(data["__fingerprint__"]), activations=activations)
        except StatsError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise StatsError(f"cannot read statistics {path} ({error}); re-run 'onnxsvd calibrate'") from error
