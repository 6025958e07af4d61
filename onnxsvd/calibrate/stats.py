"""Streaming activation statistics: per activation, in float64, ``XᵀX``, ``Σ|x|``, ``max|x|`` and rows.

Legend: T rows (all leading dimensions of one batch flattened), K channels.

Statistics are keyed by the activation tensor's name, so sites that read the same activation (Q, K and
V projections) share one entry. A statistics file records the fingerprint of the model it came from.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from scipy.linalg import blas

from onnxsvd.errors import StatsError

__all__ = ["ActivationStats", "Statistics", "StatisticsWriter", "StatsAccumulator", "combine"]

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
        native = np.asarray(batch).reshape(-1, self.abs_sum.shape[0])  # [T, K]
        if native.shape[0] == 0:
            return
        rows = native.astype(np.float64)  # [T, K]
        # rows.T is Fortran-contiguous [K, T]: syrk computes (rowsᵀ)(rowsᵀ)ᵀ = XᵀX into the upper triangle.
        self.gram = blas.dsyrk(1.0, rows.T, beta=1.0, c=self.gram, trans=0, lower=0, overwrite_c=1)
        magnitude = np.abs(rows)  # [T, K]
        self.abs_sum += magnitude.sum(axis=0)  # [K], summed in float64
        np.maximum(self.abs_max, magnitude.max(axis=0), out=self.abs_max)  # [K]
        self.rows += rows.shape[0]

    def result(self) -> ActivationStats:
        upper = self.gram  # syrk filled the upper triangle; the strict lower one is still zero: [K, K]
        gram = upper + upper.T  # [K, K]
        gram[np.diag_indices_from(gram)] *= 0.5  # the diagonal was counted twice
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
        with StatisticsWriter(path, self.fingerprint) as writer:
            writer.add(self.activations)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Statistics:
        """Open a file written by :meth:`save` or :class:`StatisticsWriter`; each activation's arrays are
        read only when it is looked up, so a rewrite holds one Gram at a time.

        Raises:
            StatsError: missing, unreadable, or not an onnxsvd statistics file.
        """
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"statistics file not found: {path}; run 'onnxsvd calibrate' to make one")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise StatsError(f"cannot read statistics {path} ({error}); re-run 'onnxsvd calibrate'") from error
        if not hasattr(data, "files") or "__fingerprint__" not in data.files:
            raise StatsError(f"{path} is not an onnxsvd statistics file; make one with 'onnxsvd calibrate'")
        try:
            names = [str(name) for name in data["__names__"]]
            fingerprint = str(data["__fingerprint__"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise StatsError(f"cannot read statistics {path} ({error}); re-run 'onnxsvd calibrate'") from error
        return cls(fingerprint=fingerprint, activations=_LazyActivations(path, data, names))


class _LazyActivations(Mapping[str, ActivationStats]):
    """Activation statistics read from an open ``.npz`` on lookup."""

    def __init__(self, path: Path, data: np.lib.npyio.NpzFile, names: list[str]) -> None:
        self.path, self.data = path, data
        self.position = {name: i for i, name in enumerate(names)}

    def __getitem__(self, name: str) -> ActivationStats:
        i = self.position[name]
        try:
            return ActivationStats(
                gram=self.data[f"gram_{i}"],
                abs_sum=self.data[f"abs_sum_{i}"],
                abs_max=self.data[f"abs_max_{i}"],
                rows=int(self.data[f"rows_{i}"]),
            )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise StatsError(f"cannot read statistics {self.path} ({error}); re-run 'onnxsvd calibrate'") from error

    def __iter__(self) -> Iterator[str]:
        return iter(self.position)

    def __len__(self) -> int:
        return len(self.position)


class StatisticsWriter:
    """Writes a statistics ``.npz`` entry by entry (nothing is kept in memory), atomically.

    Use as a context manager: ``add`` statistics as they are collected; on a clean exit the names and
    fingerprint are written and the file is moved into place; on an error nothing is left behind.
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.names: list[str] = []

    def __enter__(self) -> StatisticsWriter:
        from onnxsvd.io import atomic_path

        self._atomic = atomic_path(self.path, suffix=".npz")
        self._temporary = self._atomic.__enter__()
        self._zip = zipfile.ZipFile(self._temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        return self

    def _write(self, key: str, array: np.ndarray) -> None:
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)

    def add(self, activations: Mapping[str, ActivationStats]) -> None:
        """Append statistics (written at once)."""
        for name, stats in activations.items():
            i = len(self.names)
            self.names.append(name)
            self._write(f"gram_{i}", stats.gram)
            self._write(f"abs_sum_{i}", stats.abs_sum)
            self._write(f"abs_max_{i}", stats.abs_max)
            self._write(f"rows_{i}", np.array(stats.rows))

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        if error is None:
            self._write("__format__", np.array(_FORMAT_VERSION))
            self._write("__fingerprint__", np.array(self.fingerprint))
            self._write("__names__", np.array(self.names, dtype=str))
        self._zip.close()
        self._atomic.__exit__(type(error) if error else None, error, trace)
