"""Data readers shared by calibration and validation: ``.npz`` files whose keys are the model's input names.

Legend: S samples (axis 0 of every array), B a batch of samples.

A data source is one ``.npz`` (every model input as a key, axis 0 = samples; ``labels``, one integer
class per sample, is read for accuracy and checked like an input; other keys are ignored) or a folder of
such files, one batch each, read in name order. Everything that
can be wrong is checked against the model's graph inputs *before any work*, from the arrays' headers
alone (no array is loaded): a missing name, a dtype that would need an unsafe cast, a rank or a fixed
dimension that differs. Arrays are read file by file, so memory stays bounded by one file (plus one
batch) whatever the size of the folder.

Importing ``onnx`` here is the one exception to "only io and graph import onnx": the checks need the
model's input types, and this module is their one reader.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxsvd.errors import DataError

__all__ = ["LABELS_KEY", "Batches", "InputSpec", "InputData", "model_inputs", "load_inputs", "iter_batches"]

#: A re-iterable source of batches: each call gives a fresh iterable of ``{input name: array}`` dicts.
Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]

log = logging.getLogger(__name__)

#: The key that holds one integer class label per sample (used for accuracy, never fed to the model).
LABELS_KEY = "labels"

_SAVE_HINT = "save one array per model input with numpy.savez(path, **{input_name: array}), axis 0 = samples"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input of the model (initializers listed as inputs are excluded).

    Attributes:
        name: the input's name.
        dtype: the numpy dtype the model takes.
        shape: one entry per axis: an ``int`` for a fixed dimension, a ``str`` for a symbolic one,
            ``None`` when unknown; ``None`` as a whole when the model does not declare the rank.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    @property
    def fixed_batch(self) -> int | None:
        """The size of axis 0 when the model fixes it (an exported batch size), else ``None``."""
        return self.shape[0] if self.shape and isinstance(self.shape[0], int) else None

    def describe(self) -> str:
        """``[batch, 64]``-style text of the shape (symbolic dims by name, unknown as ``?``)."""
        if self.shape is None:
            return "[any shape]"
        parts = [str(dim) if dim is not None else "?" for dim in self.shape]
        return "[" + ", ".join(parts) + "]"


@dataclasses.dataclass(frozen=True)
class _ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class InputData:
    """A checked data source: the files, the model's inputs, and how many samples each file holds.

    Iterating yields one ``dict`` per file (model inputs cast to the model's dtypes, plus ``labels``
    when :attr:`has_labels`), capped at ``max_samples`` samples in all. Use :func:`iter_batches` for
    batches of a fixed size.

    Attributes:
        path: the ``.npz`` or folder as given.
        files: the ``.npz`` files, in reading order.
        specs: the model's graph inputs.
        file_samples: samples read from each file (after the ``max_samples`` cap; 0 for files past it).
        has_labels: every file holds ``labels``, one integer per sample, and no model input has that name
            (labels of another length or dtype, or in some files only, are a :class:`DataError`).
    """

    path: Path
    files: tuple[Path, ...]
    specs: tuple[InputSpec, ...]
    file_samples: tuple[int, ...]
    has_labels: bool

    @property
    def samples(self) -> int:
        """Samples in all (after the cap)."""
        return sum(self.file_samples)

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model fixes on axis 0 of its inputs, if any."""
        sizes = {spec.fixed_batch for spec in self.specs if spec.fixed_batch is not None}
        return sizes.pop() if len(sizes) == 1 else None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for file, samples in zip(self.files, self.file_samples, strict=True):
            if samples == 0:
                continue
            yield self._read(file, samples)

    def _read(self, file: Path, samples: int) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        try:
            with np.load(file, allow_pickle=False) as archive:
                for spec in self.specs:
                    array = archive[spec.name][:samples]  # [S, ...]
                    arrays[spec.name] = array.astype(spec.dtype, copy=False)
                if self.has_labels:
                    arrays[LABELS_KEY] = np.asarray(archive[LABELS_KEY]).reshape(-1)[:samples]  # [S]
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(f"cannot read {file}: {error}; re-save the file") from error
        return arrays


def _dims(value: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    if not value.type.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def model_inputs(model: onnx.ModelProto) -> tuple[InputSpec, ...]:
    """The graph inputs a caller must feed: every ``graph.input`` that is not also an initializer.

    Raises:
        DataError: an input is not a tensor, or its element type has no numpy dtype.
    """
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs: list[InputSpec] = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise DataError(
                f"model input {value.name!r} is not a tensor (sequence, map or optional); "
                "onnxsvd feeds tensors only"
            )
        elem_type = value.type.tensor_type.elem_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        except (KeyError, TypeError, ValueError) as error:
            name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "undefined"
            raise DataError(
                f"model input {value.name!r} has element type {name}, which numpy cannot hold"
            ) from error
        specs.append(InputSpec(value.name, dtype, _dims(value)))
    return tuple(specs)


def _npz_files(path: Path) -> tuple[Path, ...]:
    if not path.exists():
        raise DataError(f"data not found: {path}; pass an .npz file or a folder of .npz files")
    if path.is_dir():
        files = tuple(sorted(child for child in path.iterdir() if child.suffix == ".npz" and child.is_file()))
        if not files:
            raise DataError(f"folder {path} holds no .npz files; put one .npz per batch in it ({_SAVE_HINT})")
        return files
    return (path,)


def _headers(file: Path) -> dict[str, _ArrayHeader]:
    """Shape and dtype of every array of an ``.npz``, read from the ``.npy`` headers (no data loaded)."""
    if not zipfile.is_zipfile(file):
        raise DataError(f"{file} is not an .npz archive; {_SAVE_HINT}")
    headers: dict[str, _ArrayHeader] = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                headers[member[: -len(".npy")]] = _ArrayHeader(tuple(int(d) for d in shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(f"{file} is not a readable .npz archive ({error}); {_SAVE_HINT}") from error
    return headers


def _check_file(file: Path, headers: Mapping[str, _ArrayHeader], specs: tuple[InputSpec, ...]) -> int:
    """Check one file against the model's inputs; return its number of samples."""
    keys = sorted(headers)
    counts: dict[str, int] = {}
    for spec in specs:
        header = headers.get(spec.name)
        if header is None:
            raise DataError(f"input {spec.name!r} missing from {file}; it has keys {keys}")
        if spec.shape == ():
            raise DataError(
                f"model input {spec.name!r} is a scalar; onnxsvd batches inputs along axis 0 "
                "and cannot feed it"
            )
        if not np.can_cast(header.dtype, spec.dtype, casting="safe"):
            raise DataError(
                f"input {spec.name!r} in {file} is {header.dtype} but the model takes {spec.dtype}, and "
                f"{header.dtype} → {spec.dtype} is not a safe cast; save it with .astype('{spec.dtype}')"
            )
        shape = list(header.shape)
        if spec.shape and len(shape) != len(spec.shape):
            raise DataError(
                f"input {spec.name!r} in {file} has rank {len(shape)} {shape} but the model takes rank "
                f"{len(spec.shape)} {spec.describe()}; reshape it (axis 0 is samples)"
            )
        for axis, (have, want) in enumerate(zip(shape[1:], (spec.shape or ())[1:], strict=False), start=1):
            if isinstance(want, int) and have != want:
                raise DataError(
                    f"input {spec.name!r} in {file} has shape {shape} but the model takes {spec.describe()} "
                    f"(axis {axis} must be {want})"
                )
        if not shape:
            raise DataError(f"input {spec.name!r} in {file} is a scalar; give it an axis 0 of samples")
        counts[spec.name] = shape[0]
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise DataError(
            f"inputs in {file} have different sample counts on axis 0 ({listed}); "
            "every input needs one row per sample"
        )
    return next(iter(counts.values())) if counts else 0


def _has_labels(file: Path, headers: Mapping[str, _ArrayHeader], samples: int) -> bool:
    """Whether ``file`` holds ``labels``; refuse labels that cannot give accuracy (the column would vanish).

    Raises:
        DataError: ``labels`` is not one integer per sample.
    """
    header = headers.get(LABELS_KEY)
    if header is None:
        return False
    if header.shape not in ((samples,), (samples, 1)):
        raise DataError(
            f"{LABELS_KEY!r} in {file} has shape {list(header.shape)} but the file holds {samples} samples: "
            f"give one integer class per sample, shape [{samples}] (or leave the key out)"
        )
    if header.dtype.kind not in "iu":
        raise DataError(
            f"{LABELS_KEY!r} in {file} is {header.dtype}, not integer classes; save it with .astype('int64')"
        )
    return True


def load_inputs(
    path: str | os.PathLike[str], model: onnx.ModelProto, max_samples: int | None = None
) -> InputData:
    """Open and check data for ``model``: an ``.npz`` or a folder of ``.npz`` files (one batch each).

    Every file is checked against the model's inputs from its headers before any array is read:
    every input present (extra keys are ignored), a safe dtype cast (``int32 → int64`` yes,
    ``float64 → float32`` no), the same rank, and equal fixed dimensions except axis 0.

    Args:
        path: the ``.npz`` file or folder.
        model: the model the data is for.
        max_samples: read at most this many samples in all.

    Returns:
        The checked source; iterate it or pass it to :func:`iter_batches`.

    Raises:
        DataError: missing path, empty folder, not an ``.npz``, an input that does not fit the model, or
            ``labels`` that are not one integer per sample in every file.
    """
    path = Path(path)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be at least 1, got {max_samples}")
    specs = model_inputs(model)
    files = _npz_files(path)
    counts: list[int] = []
    labelled: list[bool] = []  # per file; a model input named 'labels' is an input, not labels
    for file in files:
        headers = _headers(file)
        samples = _check_file(file, headers, specs)
        counts.append(samples)
        labelled.append(LABELS_KEY not in {spec.name for spec in specs} and _has_labels(file, headers, samples))
    if any(labelled) and not all(labelled):
        with_labels, without = (next(file.name for file, has in zip(files, labelled, strict=True) if has is want)
                                for want in (True, False))
        raise DataError(
            f"{path}: {with_labels} holds {LABELS_KEY!r} but {without} does not; give every file labels or none"
        )
    labels_everywhere = all(labelled)
    if sum(counts) == 0:
        raise DataError(f"{path} holds no samples (axis 0 is empty); {_SAVE_HINT}")
    if max_samples is not None:
        left = max_samples
        capped = []
        for count in counts:
            capped.append(min(count, left))
            left -= capped[-1]
        counts = capped
    data = InputData(path, files, specs, tuple(counts), labels_everywhere)
    log.info(
        "data %s: %d samples in %d file(s), labels: %s", path, data.samples, len(files), data.has_labels
    )
    return data


def iter_batches(
    data: InputData, batch_size: int | None = None, with_labels: bool = False, drop_last: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` samples as ``{input name: array [B, ...]}``.

    Args:
        data: a checked source from :func:`load_inputs`.
        batch_size: samples per batch; ``None`` yields one batch per file.
        with_labels: also yield ``labels`` ``[B]`` (only when ``data.has_labels``).
        drop_last: drop a last batch smaller than ``batch_size`` (for models with a fixed batch size).

    Only one file and one batch are held at a time.
    """
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    keep = [spec.name for spec in data.specs] + ([LABELS_KEY] if with_labels and data.has_labels else [])
    if batch_size is None:
        for arrays in data:
            yield {name: arrays[name] for name in keep}
        return
    pending: list[dict[str, np.ndarray]] = []
    pending_count = 0
    for arrays in data:
        start = 0
        count = len(arrays[keep[0]]) if keep else 0
        while start < count:
            take = min(batch_size - pending_count, count - start)
            pending.append({name: arrays[name][start : start + take] for name in keep})
            pending_count += take
            start += take
            if pending_count == batch_size:
                yield _concatenate(pending, keep)
                pending, pending_count = [], 0
    if pending and not drop_last:
        yield _concatenate(pending, keep)


def _concatenate(parts: list[dict[str, np.ndarray]], keep: list[str]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts], axis=0) for name in keep}
