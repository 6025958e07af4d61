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
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxsvd.errors import ModelError, OutputError

__all__ = [
    "PROTOBUF_LIMIT",
    "LAZY_BYTES",
    "load_model",
    "check_external_data",
    "external_tensors",
    "external_source",
    "raw_bytes",
    "tensor_array",
    "is_lazy",
    "tensor_bytes",
    "temporary_model_path",
    "check_model",
    "check_output_path",
    "check_outputs",
    "check_output_folder",
    "probe_model",
    "save_model",
    "DataFile",
    "atomic_path",
    "fingerprint",
    "FINGERPRINT_CHUNK",
    "count_bytes",
    "count_parameters",
    "dtype_bytes",
    "file_size",
    "human_bytes",
]

log = logging.getLogger(__name__)

#: Protobuf cannot serialise a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1


#: Models whose external data is larger than this are loaded lazily: tensors are read when needed.
LAZY_BYTES = 512 * 1024 * 1024


def load_model(path: str | os.PathLike[str], lazy: bool | None = None) -> onnx.ModelProto:
    """Load an ONNX model and check it (by path, so models over 2 GB work).

    External data is validated first — every location must stay inside the model's folder and its file
    must hold the tensor's bytes — then read into memory unless ``lazy`` (default: when the external data
    is over :data:`LAZY_BYTES`). A lazy model's weights stay on disk and are read one at a time with
    :func:`tensor_array`; pass the model's folder as ``base_dir`` wherever tensors are read.

    Raises:
        ModelError: missing, empty, not ONNX, truncated, invalid, or unsafe or short external data.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}; check the path")
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not an ONNX model file; pass the .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}; re-export the model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as error:
        raise ModelError(f"{path} is not a valid ONNX model (truncated or not ONNX); re-export it") from error
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot read {path}: {error}") from error
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{path} holds no ONNX graph (truncated or not ONNX); re-export it")
    external = check_external_data(model, path.parent, str(path))
    check_model(model, path)
    if lazy is None:
        lazy = external > LAZY_BYTES
    if external and not lazy:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model (initializers, Constant values, subgraphs) stored as external data."""
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def check_external_data(model: onnx.ModelProto, base_dir: Path, where: str = "model") -> int:
    """Refuse external data that leaves ``base_dir`` or is missing or short; return its total bytes.

    Locations come from inside an untrusted file: nothing outside the model's folder is ever read.

    Raises:
        ModelError: an absolute or escaping location, a missing file, or a file shorter than the tensor.
    """
    total = 0
    for tensor in external_tensors(model):
        total += external_source(tensor, base_dir, where)[2]
    return total


def external_source(tensor: onnx.TensorProto, base_dir: Path, where: str = "model") -> tuple[Path, int, int]:
    """The file, offset and length of a tensor's external data, checked as :func:`check_external_data` does.

    Raises:
        ModelError: an absolute or escaping location, a missing file, or a file shorter than the tensor.
    """
    base = Path(base_dir).resolve()
    fields = _external_fields(tensor)
    location = fields.get("location", "")
    target = (base / location).resolve()
    if not location or Path(location).is_absolute() or (target != base and base not in target.parents):
        raise ModelError(
            f"{where}: tensor {tensor.name!r} points to external data {location!r} outside the model's "
            "folder; refusing to read it (keep data files beside the model)"
        )
    if not target.is_file():
        raise ModelError(
            f"{where}: external data file {location!r} of tensor {tensor.name!r} is missing; "
            "copy it beside the model"
        )
    offset = int(fields.get("offset", 0) or 0)
    length = int(fields["length"]) if fields.get("length") else tensor_bytes(tensor)
    if offset + length > target.stat().st_size:
        raise ModelError(
            f"{where}: external data file {location!r} is shorter than tensor {tensor.name!r} needs "
            f"({offset + length} > {target.stat().st_size} bytes); the file is truncated, re-export the model"
        )
    return target, offset, length


def probe_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model's graph without its external data (cheap), to see how the file stores its weights."""
    return onnx.load(str(path), load_external_data=False)


def tensor_array(tensor: onnx.TensorProto, base_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """The tensor's values, reading external data from ``base_dir`` when the tensor is lazy."""
    return numpy_helper.to_array(tensor, str(base_dir) if base_dir is not None else "")


def is_lazy(model: onnx.ModelProto) -> bool:
    """True when some tensor's data is still on disk (loaded with ``lazy=True``)."""
    return next(external_tensors(model), None) is not None


def check_model(model: onnx.ModelProto, path: Path | None = None, full_check: bool = False) -> None:
    """Run the ONNX checker; by path for models at or over the protobuf limit.

    Raises:
        ModelError: the model does not pass the checker.
    """
    where = f"{path}" if path is not None else "model"
    try:
        if path is not None and (model.ByteSize() >= PROTOBUF_LIMIT or is_lazy(model)):
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


def _same_file(first: Path, second: Path) -> bool:
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())


def check_outputs(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    forceable: Collection[str] = (),
    force: bool = False,
) -> None:
    """Refuse any output of a command that is one of its inputs (or lies inside an input folder), and two
    outputs that are one file: writing it would destroy the input before or while it is read.

    Args:
        outputs: option → path of every file the command writes (``None``: not written).
        inputs: option → path of every file or folder the command reads (``None``: not given).
        forceable: ``"output option=input option"`` pairs (``"-o=model"``) that ``--force`` allows: only
            overwriting an input model with its rewrite makes sense, never data, statistics or reports.
        force: ``--force`` was given.

    Raises:
        OutputError: naming both options and what to do.
    """
    seen: dict[Path, str] = {}
    for out_flag, out_path in outputs.items():
        if out_path is None:
            continue
        output = Path(out_path)
        for in_flag, in_path in inputs.items():
            pair = f"{out_flag}={in_flag}"
            if in_path is None or (force and pair in forceable):
                continue
            source = Path(in_path)
            if _same_file(output, source) or _inside(output, source):
                where = "is" if _same_file(output, source) else "is inside"
                hint = " (or --force to overwrite it)" if pair in forceable else ""
                raise OutputError(
                    f"{out_flag} {output} {where} the {in_flag} input {source}; writing it would destroy that "
                    f"input: choose another {out_flag} path{hint}"
                )
        for seen_path, seen_flag in seen.items():
            if _same_file(output, seen_path):
                raise OutputError(f"{out_flag} and {seen_flag} both name {output}; give each its own path")
        seen[output] = out_flag


def check_output_folder(
    flag: str,
    folder: str | os.PathLike[str],
    files: Collection[str | os.PathLike[str]],
    inputs: Mapping[str, str | os.PathLike[str] | None],
) -> None:
    """Refuse an output folder that holds an input, is one, or lies inside one; and any of the ``files``
    written into it that is an input (``check_outputs`` for each).

    A command that fills a folder (``sweep -o DIR``) owns what it writes there: a folder holding an input
    would mix the inputs with the results, and a rerun could overwrite an input of the same name.

    Args:
        flag: the option naming the folder (``-o``).
        folder: the output folder (it need not exist yet).
        files: every file the command would write, inside ``folder``.
        inputs: option → path of every file or folder the command reads (``None``: not given).

    Raises:
        OutputError: naming the option, the input and what to do.
    """
    output = Path(folder)
    for in_flag, in_path in inputs.items():
        if in_path is None:
            continue
        source = Path(in_path)
        if _same_file(output, source) or _inside(output, source):
            where = "is" if _same_file(output, source) else "is inside"
            raise OutputError(
                f"{flag} {output} {where} the {in_flag} input {source}; writing results there would mix them "
                f"with that input: choose another {flag} folder"
            )
        if _inside(source, output):
            raise OutputError(
                f"{flag} {output} holds the {in_flag} input {source}; the results would be written beside it "
                f"(and a rerun could overwrite it): choose a {flag} folder that holds no input"
            )
    for file in files:
        check_outputs({flag: file}, inputs)


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


def save_model(
    model: onnx.ModelProto,
    output: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    data_file: DataFile | None = None,
) -> Path:
    """Write ``model`` atomically to ``output``.

    With ``external_data`` (default: when the model is lazy or would reach 2 GB) every tensor's bytes go
    to ``<output>.data`` beside it, copied in chunks from the input's data files when the model is lazy
    (``base_dir``: the input model's folder) — the weights are never all in memory. The data file is moved
    into place before the model file, and both are removed if anything fails.

    Args:
        data_file: the :class:`DataFile` for ``output`` that tensors were already streamed to while the
            model was built (implies ``external_data``); the rest are appended to it, then it is committed.

    Raises:
        OutputError: the model cannot be serialised or written.
    """
    output = Path(output)
    lazy = is_lazy(model)
    if data_file is not None:
        external_data = True
    elif external_data is None:
        external_data = lazy or model.ByteSize() >= PROTOBUF_LIMIT
    try:
        if external_data:
            _save_external(model, output, Path(base_dir) if base_dir is not None else None, data_file)
        else:
            if lazy:
                if base_dir is None:
                    raise OutputError("the model's weights are still on disk: pass the input's folder (base_dir)")
                onnx.external_data_helper.load_external_data_for_model(model, str(base_dir))
            if model.ByteSize() >= PROTOBUF_LIMIT:
                raise OutputError(
                    "the rewritten model is over 2 GB and cannot be one protobuf; write it with --external-data"
                )
            with atomic_path(output) as temporary:
                temporary.write_bytes(model.SerializeToString())
    except OSError as error:
        raise OutputError(f"cannot write {output}: {error.strerror or error}; check the path") from error
    log.info("wrote %s (%d bytes)", output, file_size(output))
    return output


_CHUNK = 64 * 1024 * 1024


class DataFile:
    """The ``<output>.data`` file of a model being written, built in a temporary file beside it.

    Tensors are appended as they are made (:meth:`tensor` writes an array at once and returns an
    initializer pointing at it), so a rewrite holds no factor bytes in memory; :func:`save_model` appends
    the rest and commits: the file is moved into place just before the model that points to it. Use as a
    context manager: leaving it uncommitted removes the temporary file.
    """

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output)
        self.location = f"{self.output.name}.data"
        self.path = self.output.parent / self.location
        self.written: set[str] = set()
        handle, name = tempfile.mkstemp(prefix=f".{self.location}.", suffix=".tmp", dir=self.output.parent)
        self.temporary = Path(name)
        self._sink = os.fdopen(handle, "wb")

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """An initializer named ``name`` whose bytes (``array``'s) are written to the data file now."""
        array = np.ascontiguousarray(array)
        tensor = onnx.TensorProto(
            name=name, dims=array.shape, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        self.append(tensor, memoryview(array).cast("B"))
        return tensor

    def append(self, tensor: onnx.TensorProto, data: bytes | memoryview) -> None:
        """Write ``data`` and point ``tensor`` at it (any data it held inline is dropped)."""
        offset = self._sink.tell()
        self._sink.write(data)
        self._point(tensor, offset)

    def copy_from(self, tensor: onnx.TensorProto, base_dir: Path | None) -> None:
        """Copy a lazy tensor's bytes from its data file in ``base_dir``, in chunks, and point it here."""
        offset = self._sink.tell()
        _copy_external(tensor, base_dir, self._sink)
        self._point(tensor, offset)

    def holds(self, tensor: onnx.TensorProto) -> bool:
        """True when ``tensor`` was written here by :meth:`tensor`/:meth:`append`/:meth:`copy_from`."""
        return (
            tensor.name in self.written
            and tensor.data_location == onnx.TensorProto.EXTERNAL
            and _external_fields(tensor).get("location") == self.location
        )

    def _point(self, tensor: onnx.TensorProto, offset: int) -> None:
        _clear_data(tensor)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        fields = (("location", self.location), ("offset", str(offset)), ("length", str(self._sink.tell() - offset)))
        for key, value in fields:
            tensor.external_data.add(key=key, value=value)
        self.written.add(tensor.name)

    def commit(self) -> None:
        """Flush to disk and move the file into place as ``<output>.data``."""
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        with contextlib.suppress(OSError):
            os.chmod(self.temporary, _mode_for(self.path))
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        """Close and remove the temporary file if it was not committed."""
        if not self._sink.closed:
            self._sink.close()
        with contextlib.suppress(FileNotFoundError):
            self.temporary.unlink()


def _save_external(model: onnx.ModelProto, output: Path, base_dir: Path | None, data_file: DataFile | None) -> None:
    """Write every tensor's bytes to ``<output>.data`` and the graph to ``output``, atomically.

    A lazy model is rewritten in place (its tensors then point to the new data file); an in-memory model
    is copied first so the caller's tensors stay as they were. Tensors already in ``data_file`` stay.
    """
    if is_lazy(model):
        staged = model  # tiny: the weights are on disk
    else:
        staged = onnx.ModelProto()
        staged.CopyFrom(model)
    with data_file if data_file is not None else DataFile(output) as data:
        for tensor in onnx.external_data_helper._get_all_tensors(staged):
            if data.holds(tensor):
                continue
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                data.copy_from(tensor, base_dir)
            elif tensor.HasField("raw_data") or _has_typed_data(tensor):
                raw = raw_bytes(tensor)  # typed fields packed as raw_data holds them (int4 two a byte)
                if len(raw) >= 1024:  # tiny tensors stay inline, as onnx's own converter does
                    data.append(tensor, raw)
        with atomic_path(output) as temporary:
            temporary.write_bytes(staged.SerializeToString())
            # The data file goes into place just before the model that points to it.
            data.commit()


def _copy_external(tensor: onnx.TensorProto, base_dir: Path | None, sink: object) -> None:
    """Append a lazy tensor's bytes from the input's data file to ``sink``, in chunks."""
    if base_dir is None:
        raise OutputError("the model's weights are still on disk: pass the input's folder (base_dir)")
    fields = _external_fields(tensor)
    source = base_dir / fields["location"]
    start = int(fields.get("offset", 0) or 0)
    length = int(fields["length"]) if fields.get("length") else tensor_bytes(tensor)
    with open(source, "rb") as handle:
        handle.seek(start)
        left = length
        while left > 0:
            chunk = handle.read(min(_CHUNK, left))
            if not chunk:
                raise OutputError(f"external data file {source} ended early; re-export the input")
            sink.write(chunk)  # type: ignore[attr-defined]
            left -= len(chunk)


def raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """An in-memory tensor's values as ``raw_data`` holds them (little-endian, sub-byte dtypes packed),
    whether they are stored there or in typed fields (``float_data``, ``int32_data``…)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.from_array(tensor_array(tensor)).raw_data


def _has_typed_data(tensor: onnx.TensorProto) -> bool:
    return any(
        len(getattr(tensor, field))
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    )


def _clear_data(tensor: onnx.TensorProto) -> None:
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)


@contextlib.contextmanager
def temporary_model_path(model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None) -> Iterator[str]:
    """A path ONNX Runtime can open for ``model``: for a lazy model, a temporary file written into the
    model's own folder (so its external data locations resolve), removed afterwards."""
    if base_dir is None or not is_lazy(model):
        yield ""
        return
    handle, name = tempfile.mkstemp(prefix=".onnxsvd-", suffix=".onnx", dir=str(base_dir))
    os.close(handle)
    try:
        Path(name).write_bytes(model.SerializeToString())
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


#: External data is hashed in chunks of this size: a weight is never whole in memory for its hash.
FINGERPRINT_CHUNK = 16 * 1024 * 1024


def fingerprint(model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None = None) -> str:
    """A short sha256 of what the model computes: its graph, every attribute and every weight's values.

    What counts: the opset imports; each graph's input and output names and element types; every node's
    op type, domain, inputs, outputs and attributes (sorted by name, subgraphs of If/Loop/Scan hashed the
    same way, ``Constant`` values included); every initializer and sparse initializer (sorted by name) with
    its dtype, shape and values; and the model's local functions. What does not: node and graph names,
    doc strings, ``value_info``, metadata, and how a tensor is stored. A weight hashes the same held in
    ``raw_data``, in typed fields (``float_data``…) or as external data, so a model saved inline and saved
    with ``--external-data`` match; another checkpoint of the same architecture does not, and neither
    does a rewritten model its original.

    External data is read in chunks of :data:`FINGERPRINT_CHUNK` from ``base_dir`` (the model's folder),
    so hashing a lazy model holds one chunk, not one weight.

    Raises:
        ModelError: a tensor's data is on disk and ``base_dir`` is not given, or its file is missing, short or
            outside ``base_dir``.
    """
    hasher = _Fingerprint(Path(base_dir) if base_dir is not None else None)
    for opset in sorted(model.opset_import, key=lambda entry: entry.domain):
        hasher.field("opset", opset.domain, opset.version)
    hasher.graph(model.graph)
    for function in model.functions:
        hasher.field("function", function.domain, function.name, *function.input, "->", *function.output)
        hasher.field("function-attributes", *function.attribute)
        for opset in sorted(function.opset_import, key=lambda entry: entry.domain):
            hasher.field("function-opset", opset.domain, opset.version)
        for node in function.node:
            hasher.node(node)
    return hasher.digest.hexdigest()[:16]


class _Fingerprint:
    """sha256 over length-prefixed fields, so no two different models can hash the same field sequence."""

    def __init__(self, base_dir: Path | None) -> None:
        self.digest = hashlib.sha256()
        self.base_dir = base_dir

    def field(self, tag: str, *parts: object) -> None:
        self._bytes(tag.encode())
        self._length(len(parts))
        for part in parts:
            self._bytes(part if isinstance(part, bytes) else str(part).encode())

    def _bytes(self, data: bytes) -> None:
        self._length(len(data))
        self.digest.update(data)

    def _length(self, count: int) -> None:
        self.digest.update(count.to_bytes(8, "little"))

    def graph(self, graph: onnx.GraphProto) -> None:
        self.field("graph", len(graph.node), len(graph.initializer), len(graph.sparse_initializer))
        for kind, values in (("input", graph.input), ("output", graph.output)):
            for value in values:
                self.field(kind, value.name, value.type.tensor_type.elem_type)
        for node in graph.node:
            self.node(node)
        for tensor in sorted(graph.initializer, key=lambda entry: entry.name):
            self.tensor(tensor, named=True)
        for sparse in sorted(graph.sparse_initializer, key=lambda entry: entry.values.name):
            self.sparse(sparse)

    def node(self, node: onnx.NodeProto) -> None:
        self.field("node", node.op_type, node.domain, *node.input, "->", *node.output)
        for attribute in sorted(node.attribute, key=lambda entry: entry.name):
            self.attribute(attribute)

    def attribute(self, attribute: onnx.AttributeProto) -> None:
        kind = onnx.AttributeProto
        self.field("attribute", attribute.name, attribute.type, attribute.ref_attr_name)
        if attribute.type == kind.FLOAT:
            self.field("f", repr(attribute.f))
        elif attribute.type == kind.INT:
            self.field("i", attribute.i)
        elif attribute.type == kind.STRING:
            self.field("s", attribute.s)
        elif attribute.type == kind.FLOATS:
            self.field("floats", *map(repr, attribute.floats))
        elif attribute.type == kind.INTS:
            self.field("ints", *attribute.ints)
        elif attribute.type == kind.STRINGS:
            self.field("strings", *attribute.strings)
        elif attribute.type in (kind.TENSOR, kind.TENSORS):
            tensors = [attribute.t] if attribute.type == kind.TENSOR else list(attribute.tensors)
            for tensor in tensors:
                self.tensor(tensor, named=False)  # a Constant's value: its values decide, not its name
        elif attribute.type in (kind.GRAPH, kind.GRAPHS):
            for graph in [attribute.g] if attribute.type == kind.GRAPH else list(attribute.graphs):
                self.graph(graph)
        elif attribute.type in (kind.SPARSE_TENSOR, kind.SPARSE_TENSORS):
            sparses = [attribute.sparse_tensor] if attribute.type == kind.SPARSE_TENSOR else attribute.sparse_tensors
            for sparse in sparses:
                self.sparse(sparse)
        elif attribute.type in (kind.TYPE_PROTO, kind.TYPE_PROTOS):
            types = [attribute.tp] if attribute.type == kind.TYPE_PROTO else list(attribute.type_protos)
            for type_proto in types:
                self.field("type", type_proto.SerializeToString(deterministic=True))

    def sparse(self, sparse: onnx.SparseTensorProto) -> None:
        self.field("sparse", *sparse.dims)
        self.tensor(sparse.values, named=True)
        self.tensor(sparse.indices, named=False)

    def tensor(self, tensor: onnx.TensorProto, named: bool) -> None:
        self.field("tensor", tensor.name if named else "", tensor.data_type, *tensor.dims)
        if tensor.data_type == onnx.TensorProto.STRING:
            self.field("strings", *tensor.string_data)
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            self._external(tensor)
        else:
            self.field("values", raw_bytes(tensor))

    def _external(self, tensor: onnx.TensorProto) -> None:
        """Hash a tensor's bytes from its data file in chunks, framed exactly as inline ``values`` are."""
        if self.base_dir is None:
            raise ModelError(
                f"tensor {tensor.name!r} is still on disk: pass the model's folder (base_dir) to fingerprint it"
            )
        source, offset, length = external_source(tensor, self.base_dir)
        self._bytes(b"values")  # field("values", data) without holding data: tag, one part, its length…
        self._length(1)
        self._length(length)
        buffer = bytearray(min(FINGERPRINT_CHUNK, max(length, 1)))
        view = memoryview(buffer)
        with open(source, "rb") as handle:
            handle.seek(offset)
            left = length
            while left > 0:  # …then the data, one chunk at a time
                read = handle.readinto(view[: min(len(buffer), left)])
                if not read:
                    raise ModelError(f"external data file {source} ended early; re-export the model")
                self.digest.update(view[:read])
                left -= read


def _scoped_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and ``Constant`` node tensor of ``graph`` and of the If/Loop/Scan bodies in it."""
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            yield from (attribute.t for attribute in node.attribute if attribute.name == "value")
        for attribute in node.attribute:
            for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _scoped_tensors(body)


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of elements in all initializers and ``Constant`` node tensors of the main graph and of every
    If/Loop/Scan body in it."""
    return sum(_elements(tensor.dims) for tensor in _scoped_tensors(model.graph))


#: Bits per value of the dtypes ONNX packs below one byte (``raw_data`` holds them packed).
_PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)
}


def dtype_bytes(data_type: int, elements: int) -> int:
    """Bytes that ``elements`` values of ONNX dtype ``data_type`` take as stored (sub-byte dtypes packed)."""
    bits = _PACKED_BITS.get(data_type)
    if bits is not None:
        return -(-elements * bits // 8)
    return elements * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of the tensor's values from its shape and dtype (no data is read)."""
    return dtype_bytes(tensor.data_type, _elements(tensor.dims))


def count_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the values of all initializers and ``Constant`` node tensors, in the main graph and in every
    body, each in its own dtype (no data is read): what :func:`count_parameters` counts, in bytes."""
    return sum(tensor_bytes(tensor) for tensor in _scoped_tensors(model.graph))


def _elements(dims: object) -> int:
    count = 1
    for dim in dims:  # type: ignore[attr-defined]
        count *= int(dim)
    return count


def human_bytes(count: int | None) -> str:
    """``1536`` → ``"1.5 KB"`` (binary units); ``None`` → ``"-"``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


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
