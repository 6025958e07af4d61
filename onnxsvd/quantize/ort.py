"""Quantize one ``[K, N]`` weight with ONNX Runtime's ``MatMulNBitsQuantizer`` and read ``Ŵ`` back.

Legend: K input channels, N output channels, b the block size along K, n_b = ⌈K/b⌉ blocks per column.

The quantizer runs on a one-node model ``Y = X · W``; what it writes (the packed ``[N, n_b, b·bits/8]``
bytes, the scales, the zero points and the node's attributes) is taken as it is, never repacked here.
``Ŵ`` is then read back by running that ``MatMulNBits`` node in ONNX Runtime on the identity
(``I_K · Ŵ = Ŵ``), without ``accuracy_level`` so the kernel computes in the activations' float dtype: the
dequantized weight exactly as ONNX Runtime's kernel uses it, padding and rounding included. With
``accuracy_level=4`` ONNX Runtime also quantizes the activations, which no weight can reproduce; that is
left to validation through ONNX Runtime.

This module builds ONNX models, so it imports ``onnx`` like ``graph/`` does; the maths elsewhere never sees
them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.config import QuantizeConfig
from onnxsvd.errors import TORCH_INSTALL_HINT, QuantizationError

__all__ = ["QuantizedWeight", "dequantized_weight", "quantize_weight", "nbits_quantizer", "MATMUL_NBITS_DTYPES"]

#: Activation dtypes MatMulNBits takes (its T1), as numpy dtypes → ONNX dtypes.
MATMUL_NBITS_DTYPES: dict[np.dtype, int] = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
}

#: Rows of the identity fed to ONNX Runtime per run when reading ``Ŵ`` back (bounds memory: [rows, K]).
_READBACK_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One weight as ONNX Runtime's quantizer wrote it, and as its kernel dequantizes it.

    Attributes:
        packed: the quantized values, ``uint8`` ``[N, n_b, b·bits/8]`` (MatMulNBits' ``B``).
        scales: the scales in the activations' dtype (``[N, n_b]``; flat for HQQ).
        zero_points: the zero points (``uint8`` packed, or float for HQQ), ``None`` when symmetric.
        attributes: the node's attributes (``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level``).
        dequantized: ``Ŵ`` ``[K, N]`` in float64, read back from ONNX Runtime's kernel.
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    attributes: dict[str, int]
    dequantized: np.ndarray

    @property
    def base_bytes(self) -> int:
        """Bytes of the quantized weight as stored: packed values, scales and zero points."""
        extra = self.zero_points.nbytes if self.zero_points is not None else 0
        return int(self.packed.nbytes + self.scales.nbytes + extra)


_NBITS_MODULE = "onnxruntime.quantization.matmul_nbits_quantizer"


def nbits_quantizer() -> ModuleType:
    """ONNX Runtime's ``matmul_nbits_quantizer`` module, imported without what its import does to logging.

    Its import calls ``logging.basicConfig(level=INFO)``: where the root logger had no handler (a library
    user's program), every library's INFO lines would print from then on. The handler it adds is removed
    and the root's level restored; a root logger already configured (the CLI's) is left as it was.
    """
    if _NBITS_MODULE in sys.modules:
        return sys.modules[_NBITS_MODULE]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(_NBITS_MODULE)
    finally:
        for handler in [handler for handler in root.handlers if handler not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs every node at INFO through its own handler: keep it to warnings. Its
    HQQ path also hands torch a read-only view of the weight (torch warns; the view is only read)."""
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            yield
    finally:
        logger.setLevel(level)


def _one_node_model(weight: np.ndarray, elem_type: int) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="site")],
        "quantize_one_weight",
        [helper.make_tensor_value_info("x", elem_type, [None, k])],
        [helper.make_tensor_value_info("y", elem_type, [None, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _algorithm_config(config: QuantizeConfig):  # the ORT config object of the chosen algorithm
    from onnxruntime.quantization.quant_utils import QuantFormat

    quantizer = nbits_quantizer()
    if config.algorithm == "hqq":
        return quantizer.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=config.bits)
    return quantizer.DefaultWeightOnlyQuantConfig(
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level or None,
        quant_format=QuantFormat.QOperator,
        bits=config.bits,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:200]


def quantize_weight(weight: np.ndarray, dtype: np.dtype, config: QuantizeConfig) -> QuantizedWeight:
    """Quantize ``weight`` ``[K, N]`` as ONNX Runtime's ``MatMulNBitsQuantizer`` does, and read ``Ŵ`` back.

    Args:
        weight: the normal-form weight ``W_kn`` ``[K, N]`` (any float dtype; rounded to ``dtype`` first).
        dtype: the dtype the site computes in: float32, float16 or bfloat16 (MatMulNBits' ``T1``).
        config: bits, block size, symmetry, accuracy level, algorithm.

    Returns:
        The quantizer's tensors and attributes, and ``Ŵ`` ``[K, N]`` in float64.

    Raises:
        QuantizationError: a dtype MatMulNBits does not take, or the quantizer or its kernel failed (the
            message says which and why; the site then stays dense).
    """
    dtype = np.dtype(dtype)
    if dtype not in MATMUL_NBITS_DTYPES:
        raise QuantizationError(
            f"MatMulNBits computes in fp32, fp16 or bf16, not {dtype.name}: ONNX Runtime's quantizer cannot take it"
        )
    elem_type = MATMUL_NBITS_DTYPES[dtype]
    k, n = weight.shape
    quantizer_module = nbits_quantizer()  # heavy: only when used
    model = _one_node_model(np.ascontiguousarray(np.asarray(weight).astype(dtype)), elem_type)
    try:
        with _quiet_quantizer():
            quantizer = quantizer_module.MatMulNBitsQuantizer(model, algo_config=_algorithm_config(config))
            quantizer.process()
    except ImportError as error:  # HQQ imports torch
        raise QuantizationError(f"--quant-algo {config.algorithm} needs torch: {TORCH_INSTALL_HINT}") from error
    except (RuntimeError, ValueError, AssertionError, TypeError, NotImplementedError) as error:
        raise QuantizationError(
            f"ONNX Runtime's quantizer failed on a {dtype.name} [{k}, {n}] weight ({config.label}): "
            f"{_first_line(error)}"
        ) from error
    quantized = quantizer.model.model
    nodes = [node for node in quantized.graph.node if node.op_type == "MatMulNBits"]
    if len(nodes) != 1 or len(quantized.graph.node) != 1:
        ops = ", ".join(node.op_type for node in quantized.graph.node)
        raise QuantizationError(f"ONNX Runtime's quantizer left the weight unquantized ({ops or 'no nodes'})")
    node = nodes[0]
    tensors = {tensor.name: numpy_helper.to_array(tensor) for tensor in quantized.graph.initializer}
    inputs = list(node.input)
    packed, scales = tensors[inputs[1]], tensors[inputs[2]]
    zero_points = tensors[inputs[3]] if len(inputs) > 3 and inputs[3] else None
    attributes = {attribute.name: int(helper.get_attribute_value(attribute)) for attribute in node.attribute}
    dequantized = _read_back(node, quantized.graph.initializer, elem_type, dtype, k, n)
    return QuantizedWeight(packed, scales, zero_points, attributes, dequantized)


def dequantized_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    """``Ŵ`` ``[K, N]`` (float64) of a ``MatMulNBits`` node of a model, read back from ONNX Runtime's kernel.

    The same read-back as :func:`quantize_weight` (the node without ``accuracy_level``, run on ``I_K``), so
    whoever computes ``X·Ŵ`` from it (the torch evaluator of ``finetune``) uses the weight ONNX Runtime uses.

    Args:
        node: the ``MatMulNBits`` node (com.microsoft).
        initializers: the model's initializers by name; the node's packed weight, scales and zero points
            (inputs 1–3) must be among them.

    Raises:
        QuantizationError: an input that is not an initializer, a ``g_idx`` input, a scale dtype that
            MatMulNBits does not take, or ONNX Runtime failed to run the node.
    """
    inputs = list(node.input)
    if len(inputs) > 4 and inputs[4]:
        raise QuantizationError(f"MatMulNBits node {node.name!r} has a g_idx input (act-order): not read back here")
    weights = [name for name in inputs[1:4] if name]
    missing = [name for name in weights if name not in initializers]
    if len(inputs) < 3 or missing:
        raise QuantizationError(
            f"MatMulNBits node {node.name!r}: its packed weight and scales must be initializers "
            f"({', '.join(missing) or 'too few inputs'} is not)"
        )
    attributes = {a.name: int(helper.get_attribute_value(a)) for a in node.attribute}
    if "K" not in attributes or "N" not in attributes:
        raise QuantizationError(f"MatMulNBits node {node.name!r} lacks its K or N attribute")
    scales = initializers[inputs[2]]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(scales.data_type))
    if dtype not in MATMUL_NBITS_DTYPES:
        raise QuantizationError(f"MatMulNBits node {node.name!r} has {dtype.name} scales, not fp32, fp16 or bf16")
    plain = helper.make_node("MatMulNBits", ["x", *inputs[1:4]], ["y"], domain=node.domain,
                             **{name: value for name, value in attributes.items()})
    return _read_back(plain, [initializers[name] for name in weights], MATMUL_NBITS_DTYPES[dtype], dtype,
                      attributes["K"], attributes["N"])


def _read_back(
    node: onnx.NodeProto, initializers, elem_type: int, dtype: np.dtype, k: int, n: int
) -> np.ndarray:
    """``Ŵ`` ``[K, N]``: the MatMulNBits node (without ``accuracy_level``) run on ``I_K``, in row chunks."""
    import onnxruntime as ort  # heavy: only when used

    plain = helper.make_node(
        "MatMulNBits", ["x", *node.input[1:]], ["y"], name="read_back", domain="com.microsoft",
        **{a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "accuracy_level"},
    )
    graph = helper.make_graph(
        [plain], "read_back",
        [helper.make_tensor_value_info("x", elem_type, [None, k])],
        [helper.make_tensor_value_info("y", elem_type, [None, n])],
        list(initializers),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rows = []
        for start in range(0, k, _READBACK_ROWS):
            stop = min(start + _READBACK_ROWS, k)
            identity = np.zeros((stop - start, k), dtype=dtype)  # rows start…stop of I_K: [rows, K]
            identity[np.arange(stop - start), np.arange(start, stop)] = 1
            rows.append(np.asarray(session.run(None, {"x": identity})[0]).astype(np.float64))  # [rows, N]
    except Exception as error:  # onnxruntime raises its own exception types (Fail, NotImplemented, …)
        raise QuantizationError(
            f"ONNX Runtime's MatMulNBits kernel cannot run a {dtype.name} weight here: {_first_line(error)}"
        ) from error
    dequantized = np.concatenate(rows, axis=0)  # Ŵ: [K, N]
    if not np.all(np.isfinite(dequantized)):
        raise QuantizationError("the quantized weight holds NaN or Inf (its scales overflow the dtype)")
    return dequantized
