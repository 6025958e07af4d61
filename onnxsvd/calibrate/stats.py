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
from onnxsvd.io import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "ActivationStats",
    "Statistics",
    "StatisticsWriter",
    "StatsAccumulator",
    "Workspace",
    "combine",
]

#: The statistics file's format. 2: the model fingerprint covers weight values and node attributes (files
#: of format 1 carry a fingerprint of the structure alone, which another checkpoint also matched).
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Statistics of one activation ``X`` ``[T, K]`` over all calibration rows.

    Attributes:
        gram: ``[K, K]`` ``XᵀX``.
        abs_sum: ``[K]`` ``Σ_t |x_tk|``.
        abs_max: ``[K]`` ``max_t |x_tk|``.
        rows: ``T``.
        positions: the rows there were, when fewer were kept (a Conv input's im2col patches are sampled
            past a cap per batch); ``None`` when every row was kept.
    """

    gram: np.ndarray
    abs_sum: np.ndarray
    abs_max: np.ndarray
    rows: int
    positions: int | None = None

    @property
    def sampled(self) -> bool:
        """True when the rows are a sample of the positions there were."""
        return self.positions is not None and self.positions > self.rows

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
        positions=sum(p.positions or p.rows for p in parts) if any(p.sampled for p in parts) else None,
    )


class Workspace:
    """Row buffers reused from batch to batch, one per dtype, grown as needed.

    A batch's rows (hundreds of MB for a wide model) would otherwise be fresh memory every time, and
    faulting those pages in costs as much as the Gram itself. Not thread-safe: one per collecting loop.
    """

    def __init__(self) -> None:
        self._buffers: dict[np.dtype, np.ndarray] = {}

    def array(self, dtype: np.dtype | type, rows: int, channels: int) -> np.ndarray:
        """A C-contiguous ``[rows, channels]`` view of the ``dtype`` buffer; its contents are undefined."""
        dtype = np.dtype(dtype)
        size = rows * channels
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[dtype] = np.empty(size, dtype=dtype)
        return buffer[:size].reshape(rows, channels)


class StatsAccumulator:
    """Accumulates one activation's statistics batch by batch, in float64, holding nothing but sums."""

    def __init__(self, channels: int) -> None:
        # Upper triangle only, Fortran order, so BLAS syrk adds XᵀX in place at half a GEMM's cost.
        self.gram = np.zeros((channels, channels), dtype=np.float64, order="F")  # [K, K]
        self.abs_sum = np.zeros(channels, dtype=np.float64)  # [K]
        self.abs_max = np.zeros(channels, dtype=np.float64)  # [K]
        self.rows = 0
        self.positions = 0

    def update(self, batch: np.ndarray, workspace: Workspace | None = None, positions: int | None = None) -> None:
        """Add a batch ``[..., K]`` (all leading dimensions are rows).

        Args:
            batch: the rows, in any real dtype; they are widened to float64 before any arithmetic.
            workspace: reusable buffers for the float64 copy (a fresh array without one).
            positions: the rows the batch had when these are a sample of them (``None``: all of them).
        """
        native = np.asarray(batch).reshape(-1, self.abs_sum.shape[0])  # [T, K]
        self.positions += native.shape[0] if positions is None else positions
        if native.shape[0] == 0:
            return
        if workspace is None:
            rows = native.astype(np.float64)  # [T, K]
        else:
            rows = workspace.array(np.float64, *native.shape)  # [T, K]
            np.copyto(rows, native)
        # rows.T is Fortran-contiguous [K, T]: syrk computes (rowsᵀ)(rowsᵀ)ᵀ = XᵀX into the upper triangle.
        self.gram = blas.dsyrk(1.0, rows.T, beta=1.0, c=self.gram, trans=0, lower=0, overwrite_c=1)
        magnitude = np.abs(rows, out=rows)  # [T, K], in place: the rows are not needed any more
        self.abs_sum += magnitude.sum(axis=0)  # [K], summed in float64
        np.maximum(self.abs_max, magnitude.max(axis=0), out=self.abs_max)  # [K]
        self.rows += rows.shape[0]

    def result(self, copy: bool = True) -> ActivationStats:
        """The statistics so far.

        Args:
            copy: return copies; with ``False`` the Gram is the accumulator's own buffer (no new memory),
                valid until the next :meth:`update`: for a caller that is done accumulating.
        """
        _mirror_upper(self.gram)  # syrk never reads the strict lower triangle, so filling it is harmless
        gram = self.gram.T  # C-contiguous view of the same (now symmetric) buffer: [K, K]
        positions = self.positions if self.positions > self.rows else None
        if not copy:
            return ActivationStats(gram, self.abs_sum, self.abs_max, self.rows, positions)
        return ActivationStats(gram.copy(), self.abs_sum.copy(), self.abs_max.copy(), self.rows, positions)


def _mirror_upper(square: np.ndarray, block: int = 256) -> None:
    """Copy the upper triangle of ``square`` onto its strict lower triangle, in place, block by block
    (one transposed pass over the whole matrix would miss the cache at every element)."""
    size = square.shape[0]
    for start in range(0, size, block):
        stop = min(start + block, size)
        diagonal = square[start:stop, start:stop]
        diagonal[...] = np.triu(diagonal) + np.triu(diagonal, 1).T
        for other in range(stop, size, block):
            end = min(other + block, size)
            square[other:end, start:stop] = square[start:stop, other:end].T


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
            StatsError: missing, unreadable, not an onnxsvd statistics file, or of another format version
                (:data:`FORMAT_VERSION`).
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
            version = int(data["__format__"]) if "__format__" in data.files else None
            names = [str(name) for name in data["__names__"]]
            fingerprint = str(data["__fingerprint__"])
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as error:
            raise StatsError(f"cannot read statistics {path} ({error}); re-run 'onnxsvd calibrate'") from error
        if version != FORMAT_VERSION:
            found = "no format version" if version is None else f"format {version}"
            raise StatsError(
                f"statistics {path} have {found}, this onnxsvd reads format {FORMAT_VERSION}; "
                "re-run 'onnxsvd calibrate' on the model to make them again"
            )
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
                positions=int(self.data[f"positions_{i}"]) if f"positions_{i}" in self.data.files else None,
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
            if stats.sampled:
                self._write(f"positions_{i}", np.array(stats.positions))

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        if error is None:
            self._write("__format__", np.array(FORMAT_VERSION))
            self._write("__fingerprint__", np.array(self.fingerprint))
            self._write("__names__", np.array(self.names, dtype=str))
        self._zip.close()
        self._atomic.__exit__(type(error) if error else None, error, trace)
