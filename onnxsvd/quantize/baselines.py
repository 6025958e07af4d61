"""ONNX Runtime's own quantizers run whole-model, as the baselines a sweep measures onnxsvd against.

Each baseline is ONNX Runtime's quantizer called through its API on the original model, as a user who has
ONNX Runtime would call it; nothing is re-implemented here:

- ``int8``: ``onnxruntime.quantization.quantize_dynamic``, int8 weights per channel (``MatMulInteger``
  with a dynamically quantized activation);
- ``int4-b32``, ``int4-b128``: ``MatMulNBitsQuantizer``, int4 RTN, symmetric blocks of 32 or 128 along K,
  ``accuracy_level`` 4 (int8 activations inside the kernel: ONNX Runtime's fast CPU path);
- ``int4``: both int4 block sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from onnxsvd import io
from onnxsvd.errors import QuantizationError, UsageError
from onnxsvd.quantize.ort import nbits_quantizer

__all__ = ["BASELINES", "BASELINE_GROUPS", "Baseline", "parse_baselines", "write_baseline"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One ONNX Runtime quantizer setting.

    Attributes:
        name: the sweep's method name for its row (``ort-int8``…).
        label: what it is, in words.
        bits: weight bits.
        block_size: MatMulNBits' block along K (``None`` for ``quantize_dynamic``).
    """

    name: str
    label: str
    bits: int
    block_size: int | None = None


#: Every baseline, by the name ``--baselines`` takes.
BASELINES: dict[str, Baseline] = {
    "int8": Baseline("ort-int8", "ORT quantize_dynamic int8, per channel", 8),
    "int4-b32": Baseline("ort-int4-b32", "ORT MatMulNBits int4 RTN, block 32, accuracy_level 4", 4, 32),
    "int4-b128": Baseline("ort-int4-b128", "ORT MatMulNBits int4 RTN, block 128, accuracy_level 4", 4, 128),
}
#: Names that stand for several baselines.
BASELINE_GROUPS: dict[str, tuple[str, ...]] = {"int4": ("int4-b32", "int4-b128")}


def parse_baselines(text: str | None) -> tuple[str, ...]:
    """``"int8,int4"`` → ``("int8", "int4-b32", "int4-b128")`` (groups expanded, order kept, no repeats).

    Raises:
        UsageError: an unknown name (the message lists the choices) or an empty list.
    """
    if text is None:
        return ()
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    choices = ", ".join([*BASELINE_GROUPS, *BASELINES])
    if not names:
        raise UsageError(f"--baselines takes a comma-separated list of {choices}, got {text!r}")
    expanded: list[str] = []
    for name in names:
        if name not in BASELINES and name not in BASELINE_GROUPS:
            raise UsageError(f"unknown baseline {name!r}; use one of {choices}")
        for member in BASELINE_GROUPS.get(name, (name,)):
            if member not in expanded:
                expanded.append(member)
    return tuple(expanded)


def _dynamic_int8(model_path: Path, output: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model_path, output, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     weight_type=QuantType.QInt8)


def _nbits(block_size: int) -> Callable[[Path, Path], None]:
    def run(model_path: Path, output: Path) -> None:
        quantizer = nbits_quantizer().MatMulNBitsQuantizer(str(model_path), bits=4, block_size=block_size,
                                                           is_symmetric=True, accuracy_level=4)
        quantizer.process()
        io.save_model(quantizer.model.model, output, base_dir=model_path.parent)
    return run


def write_baseline(name: str, model_path: str | os.PathLike[str], output: str | os.PathLike[str]) -> Path:
    """Quantize ``model_path`` with baseline ``name`` (a key of :data:`BASELINES`) into ``output``, atomically.

    Raises:
        UsageError: an unknown name.
        QuantizationError: ONNX Runtime's quantizer failed (its message's last line).
    """
    if name not in BASELINES:
        raise UsageError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")
    baseline = BASELINES[name]
    model_path, output = Path(model_path), Path(output)
    build = _dynamic_int8 if baseline.block_size is None else _nbits(baseline.block_size)
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        with tempfile.TemporaryDirectory(prefix="onnxsvd-baseline-", dir=output.parent) as scratch:
            written = Path(scratch) / output.name
            build(model_path, written)
            io.save_model(io.load_model(written), output, base_dir=written.parent)  # moved into place atomically
    except (RuntimeError, ValueError, AssertionError, TypeError, NotImplementedError) as error:
        text = str(error).strip().splitlines()
        raise QuantizationError(
            f"ONNX Runtime's quantizer failed on {model_path} ({baseline.label}): {text[-1] if text else error!r}"
        ) from error
    finally:
        quantizer_log.setLevel(level)
    log.info("baseline %s written to %s", baseline.name, output)
    return output
