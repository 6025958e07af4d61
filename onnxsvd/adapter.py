"""ONNX Runtime adapter files (``.onnx_adapter``): writing them, reading them back, checking one against
its adapter model, and runs with an adapter active.

An adapter is a set of named values that ONNX Runtime feeds to the model's own inputs on each run with
the adapter active (``RunOptions.add_active_adapter``). Written through ``onnxruntime.AdapterFormat``;
its model version ties it to one ``base_lora.onnx`` (see :func:`onnxsvd.graph.lora.lora_info`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxsvd.errors import ModelError

__all__ = ["AdapterFile", "write_adapter", "read_adapter", "check_adapter", "AdapterSession", "adapter_session"]


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """An adapter as read back: its versions and its values (name → array)."""

    path: str
    model_version: int
    adapter_version: int
    values: Mapping[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Bytes of the values (the file adds a small header)."""
        return sum(int(value.nbytes) for value in self.values.values())


def write_adapter(
    path: str | os.PathLike[str], values: Mapping[str, np.ndarray], model_version: int, adapter_version: int = 1
) -> None:
    """Write ``values`` as an ONNX Runtime adapter file at ``path`` (the caller makes it atomic)."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(int(adapter_version))
    adapter.set_model_version(int(model_version))
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                            for name, value in values.items()})
    adapter.export_adapter(str(path))


def read_adapter(path: str | os.PathLike[str]) -> AdapterFile:
    """Read an adapter file.

    Raises:
        ModelError: the file is missing or is not an ONNX Runtime adapter.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"adapter {path} not found; pass an .onnx_adapter written by 'onnxsvd extract'")
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
        values = {name: value.numpy() for name, value in adapter.get_parameters().items()}
    except Exception as error:  # onnxruntime's pybind errors are plain Exceptions
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path} is not an ONNX Runtime adapter ({first}); pass an .onnx_adapter file") from error
    return AdapterFile(str(path), int(adapter.get_model_version()), int(adapter.get_adapter_version()), values)


def check_adapter(
    adapter: AdapterFile, model_version: int, inputs: Mapping[str, tuple[int, int, int]], where: str
) -> None:
    """Refuse an adapter made for another adapter model.

    Args:
        adapter: the adapter read back.
        model_version: the version ``where`` declares.
        inputs: adapter input name → ``(ONNX dtype, K or 0, N or 0)``: the static dimension of each factor
            (``A`` ``[K, r]``: ``(dtype, K, 0)``; ``B`` ``[r, N]``: ``(dtype, 0, N)``).
        where: the adapter model's path, for messages.

    Raises:
        ModelError: another model version, an input the model lacks, or a value of another dtype or shape.
    """
    from onnx import helper

    hint = f"use an adapter written for {where} by the same 'onnxsvd extract'"
    if adapter.model_version != model_version:
        raise ModelError(
            f"adapter {adapter.path} is for model version {adapter.model_version}, {where} is version "
            f"{model_version}: it was extracted for another base; {hint}"
        )
    for name, value in adapter.values.items():
        if name not in inputs:
            raise ModelError(f"adapter {adapter.path} sets {name!r}, which {where} does not take; {hint}")
        dtype, rows, columns = inputs[name]
        expected = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
        if value.dtype != expected or value.ndim != 2 or (rows and value.shape[0] != rows) or (
            columns and value.shape[1] != columns
        ):
            raise ModelError(
                f"adapter {adapter.path} gives {name!r} as {value.dtype} {list(value.shape)}, {where} takes "
                f"{expected} [{rows or 'r'}, {columns or 'r'}]; {hint}"
            )


class AdapterSession:
    """An ONNX Runtime session whose every run has one adapter active; otherwise the session itself.

    ``run`` and ``run_with_iobinding`` pass run options with the adapter active unless the caller gives its
    own; everything else (``get_outputs``, ``io_binding``, ``end_profiling``…) is the session's.
    """

    def __init__(self, session: Any, adapter_path: str | os.PathLike[str]) -> None:
        import onnxruntime as ort

        self._session = session
        self.adapter = ort.LoraAdapter()
        self.adapter.Load(str(adapter_path))
        self.run_options = ort.RunOptions()
        self.run_options.add_active_adapter(self.adapter)

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        return self._session.run(output_names, input_feed, run_options or self.run_options)

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> Any:
        return self._session.run_with_iobinding(binding, run_options or self.run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def adapter_session(session: Any, adapter_path: str | os.PathLike[str]) -> AdapterSession:
    """``session`` with the adapter at ``adapter_path`` active on every run."""
    return AdapterSession(session, adapter_path)
