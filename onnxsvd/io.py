"""Loading, checking and saving models; atomic writes; the model fingerprint.

Every failure a user can cause here is a :class:`ModelError` or :class:`OutputError` naming the file and
what to do. Outputs are written to a temporary file in the destination folder and moved into place, so
a failure never leaves a half-written file and never touches the input.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxsvd.errors import ModelError, OutputError

__all__ = [
    "PROTOBUF_LIMIT",
    "load_model",
    "check_model",
    "check_output_path",
    "save_model",
    "atomic_path",
    "fingerprint",
    "count_parameters",
    "file_size",
]

log = logging.getLogger(__name__)

#: Protobuf cannot serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model (with its external data) and check it.

    Raises:
        ModelError: missing, empty, not ONNX, truncated, or invalid.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}; check the path")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not an ONNX model file; pass the .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}; re-export the model")
    try:
        model = onnx.load(str(path))
    except DecodeError as error:
        raise ModelError(f"{path} is not a valid ONNX model (truncated or not ONNX); re-export it") from error
    except onnx.checker.ValidationError as error:
        # onnx refuses external data that is missing or outside the model's folder (absolute, "../").
        raise ModelError(
            f"{path} refers to external data that cannot be used ({error}); keep the data files in the "
            "model's folder and re-export it"
        ) from error
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot read {path}: {error}") from error
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{path} holds no ONNX graph (truncated or not ONNX); re-export it")
    check_model(model, path)
    return model


def check_model(model: onnx.ModelProto, path: Path | None = None, full_check: bool = False) -> None:
    """Run the ONNX checker; by path for models at or over the protobuf limit.

    Raises:
        ModelError: the model does not pass the checker.
    """
    where = f"{path}" if path is not None else "model"
    try:
        if model.ByteSize() >= PROTOBUF_LIMIT and path is not None:
            onnx.checker.check_model(str(path), full_check=full_check)
        else:
            onnx.checker.check_model(model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{where} fails the ONNX checker ({first}); fix or re-export the model") from error


def check_output_path(output: str | os.PathLike[str], input_path: str | os.PathLike[str] | None, force: bool) -> Path:
    """Refuse an output that would overwrite the input (unless ``force``), or that cannot be written.

    Raises:
        OutputError: the output equals the input, its folder is missing, or it is not writable.
    """
    output = Path(output)
    if input_path is not None and output.exists() and Path(input_path).exists():
        if os.path.samefile(output, input_path) and not force:
            raise OutputError(f"output {output} is the input model; choose another -o path (or --force)")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if output.is_dir():
        raise OutputError(f"output {output} is a folder; give a file path such as {output / 'model.onnx'}")
    if not os.access(folder, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise OutputError(f"output {output} is not writable; choose a path you can write to")
    return output


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; move it into place only if the block succeeds."""
    destination = Path(destination)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=suffix or ".tmp", dir=destination.parent or Path(".")
    )
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        # mkstemp makes the file private (0600): give it the mode of the file it replaces, or the mode
        # a plain open() would (0666 less the umask), so others can still read the model.
        with contextlib.suppress(OSError):
            os.chmod(temporary_path, _mode_for(destination))
        yield temporary_path
        os.replace(temporary_path, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary_path.unlink()


def _mode_for(destination: Path) -> int:
    """Permission bits for a file written to ``destination``."""
    try:
        return stat.S_IMODE(destination.stat().st_mode)
    except OSError:
        umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask


def save_model(model: onnx.ModelProto, output: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically to ``output``.

    Raises:
        OutputError: the model cannot be serialised or written.
    """
    output = Path(output)
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise OutputError(
            "the rewritten model is over 2 GB and cannot be one protobuf; write it with --external-data"
        )
    try:
        with atomic_path(output) as temporary:
            temporary.write_bytes(model.SerializeToString())
    except OSError as error:
        raise OutputError(f"cannot write {output}: {error.strerror or error}; check the path") from error
    log.info("wrote %s (%d bytes)", output, output.stat().st_size)
    return output


def fingerprint(model: onnx.ModelProto) -> str:
    """A short hash of the graph (ops, edges) and the weights' names, dtypes and shapes (not values).

    Two exports of the same architecture with the same names match; a rewritten model does not match
    its original, which is what calibration statistics need.
    """
    digest = hashlib.sha256()
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        digest.update(f"io:{value.name}:{value.type.tensor_type.elem_type}\n".encode())
    for node in graph.node:
        digest.update(f"node:{node.op_type}:{','.join(node.input)}->{','.join(node.output)}\n".encode())
    for tensor in graph.initializer:
        digest.update(f"init:{tensor.name}:{tensor.data_type}:{list(tensor.dims)}\n".encode())
    return digest.hexdigest()[:16]


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of elements in all initializers and ``Constant`` node tensors of the main graph."""
    total = 0
    for tensor in model.graph.initializer:
        total += _elements(tensor.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    total += _elements(attribute.t.dims)
    return total


def _elements(dims: object) -> int:
    count = 1
    for dim in dims:  # type: ignore[attr-defined]
        count *= int(dim)
    return count


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes of a model file plus the external data files it references (located beside it)."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return total
    seen: set[str] = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in seen:
                    seen.add(entry.value)
                    data = path.parent / entry.value
                    if data.exists():
                        total += data.stat().st_size
    return total
