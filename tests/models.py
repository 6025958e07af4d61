"""Tiny ONNX models built in code from a seeded generator, and the checks every test shares.

Every builder returns a :class:`Case`: the model (already through ``onnx.checker`` with
``full_check=True``), inputs to feed it, and the normal-form weight ``W_kn`` ``[K, N]`` of each site
(float64, the value the site really multiplies by) so tests can compute references with numpy.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "OPSET",
    "IR_VERSION",
    "WEIGHT_SOURCES",
    "BLOCKED_SOURCE",
    "BIAS_KINDS",
    "Case",
    "make_model",
    "weight_source",
    "matmul_case",
    "gemm_case",
    "shared_weight_case",
    "identity_shared_case",
    "tied_embedding_case",
    "run",
    "relative_error",
    "assert_valid",
    "op_types",
    "initializer",
    "unused_initializers",
]

OPSET = 17
IR_VERSION = 8

#: How a constant weight can reach a site (see :func:`weight_source`).
WEIGHT_SOURCES = (
    "initializer",
    "constant",
    "transpose",
    "identity",
    "cast_fp16",
    "cast_bf16",
    "dequant_tensor",
    "dequant_channel",
    "constant_transpose",
)

#: Needs opset 21 (``DequantizeLinear`` with ``block_size``) and IR version 10.
BLOCKED_SOURCE = "dequant_block"

#: Gemm's C: absent, a scalar, ``[N]``, ``[1, N]``, ``[M, N]``.
BIAS_KINDS = ("none", "scalar", "n", "1n", "mn")


@dataclasses.dataclass
class Case:
    """A model, its inputs, and the normal-form weight of each site by node name."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """A checked model with one default-domain opset."""
    graph = helper.make_graph(nodes, "test_graph", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version, producer_name="onnxsvd-tests"
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def weight_source(
    rng: np.random.Generator, name: str, shape: tuple[int, int], kind: str, dtype: int = TensorProto.FLOAT
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str, np.ndarray]:
    """A constant ``[P, Q]`` weight reached through ``kind``.

    Returns:
        (nodes, initializers, the name the site reads, the value it reads as float64 ``[P, Q]``).
    """
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    value = rng.standard_normal(shape)  # [P, Q]
    if kind == "initializer":
        stored = value.astype(np_dtype)
        return [], [numpy_helper.from_array(stored, name)], name, stored.astype(np.float64)
    if kind == "constant":
        stored = value.astype(np_dtype)
        node = helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(stored))
        return [node], [], name, stored.astype(np.float64)
    if kind == "transpose":
        stored = np.ascontiguousarray(value.T.astype(np_dtype))  # [Q, P]
        node = helper.make_node("Transpose", [f"{name}_t"], [name], name=f"{name}_transpose", perm=[1, 0])
        return [node], [numpy_helper.from_array(stored, f"{name}_t")], name, stored.T.astype(np.float64)
    if kind == "identity":
        stored = value.astype(np_dtype)
        node = helper.make_node("Identity", [f"{name}_raw"], [name], name=f"{name}_identity")
        return [node], [numpy_helper.from_array(stored, f"{name}_raw")], name, stored.astype(np.float64)
    if kind in ("cast_fp16", "cast_bf16"):
        storage = np.float16 if kind == "cast_fp16" else ml_dtypes.bfloat16
        stored = value.astype(np.float32).astype(storage)
        node = helper.make_node("Cast", [f"{name}_low"], [name], name=f"{name}_cast", to=dtype)
        return [node], [numpy_helper.from_array(stored, f"{name}_low")], name, stored.astype(np.float64)
    if kind in ("dequant_tensor", "dequant_channel"):
        quantized = rng.integers(-127, 128, size=shape).astype(np.int8)  # [P, Q]
        if kind == "dequant_tensor":
            scale = np.array(0.02, dtype=np.float32)
            zero = np.array(3, dtype=np.int8)
            attrs: dict[str, int] = {}
            real = (quantized.astype(np.float64) - 3.0) * float(scale)
        else:
            scale = rng.uniform(0.005, 0.05, size=shape[1]).astype(np.float32)  # [Q]
            zero = rng.integers(-5, 6, size=shape[1]).astype(np.int8)  # [Q]
            attrs = {"axis": 1}
            real = (quantized.astype(np.float64) - zero.astype(np.float64)[None, :]) * scale.astype(np.float64)[None, :]
        node = helper.make_node(
            "DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [name], name=f"{name}_dq", **attrs
        )
        tensors = [
            numpy_helper.from_array(quantized, f"{name}_q"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(zero, f"{name}_zero"),
        ]
        return [node], tensors, name, real
    if kind == "dequant_block":
        # Blocked quantization (opset 21): one scale per 4 rows of each column; the last block is short.
        block = 4
        blocks = -(-shape[0] // block)
        quantized = rng.integers(-127, 128, size=shape).astype(np.int8)  # [P, Q]
        scale = rng.uniform(0.005, 0.05, size=(blocks, shape[1])).astype(np.float32)  # [⌈P/4⌉, Q]
        zero = rng.integers(-5, 6, size=(blocks, shape[1])).astype(np.int8)  # [⌈P/4⌉, Q]
        expand = np.repeat(np.arange(blocks), block)[: shape[0]]  # row → its block
        real = (quantized.astype(np.float64) - zero[expand].astype(np.float64)) * scale[expand].astype(np.float64)
        node = helper.make_node(
            "DequantizeLinear",
            [f"{name}_q", f"{name}_scale", f"{name}_zero"],
            [name],
            name=f"{name}_dq",
            axis=0,
            block_size=block,
        )
        tensors = [
            numpy_helper.from_array(quantized, f"{name}_q"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(zero, f"{name}_zero"),
        ]
        return [node], tensors, name, real
    if kind == "constant_transpose":
        stored = np.ascontiguousarray(value.T.astype(np_dtype))  # [Q, P]
        nodes = [
            helper.make_node(
                "Constant", [], [f"{name}_t"], name=f"{name}_const", value=numpy_helper.from_array(stored)
            ),
            helper.make_node("Transpose", [f"{name}_t"], [name], name=f"{name}_transpose"),
        ]
        return nodes, [], name, stored.T.astype(np.float64)
    raise ValueError(f"unknown weight source {kind!r}")


def _activation(rng: np.random.Generator, shape: tuple[int, ...], dtype: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(dtype))


def matmul_case(
    rng: np.random.Generator,
    k: int,
    n: int,
    lead: tuple[int, ...] = (3,),
    side: str = "right",
    source: str = "initializer",
    dtype: int = TensorProto.FLOAT,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    name: str = "mm",
) -> Case:
    """``Y = X · W`` (``side="right"``, ``X`` ``[*lead, K]``) or ``Y = W · X`` (``side="left"``,
    ``W`` ``[N, K]``, ``X`` ``[*lead[:-1], K, lead[-1]]``); either way the normal form is ``[K, N]``."""
    weight_shape = (k, n) if side == "right" else (n, k)
    nodes, tensors, weight_name, value = weight_source(rng, "W", weight_shape, source, dtype)
    if side == "right":
        x_shape = (*lead, k)
        inputs = ["X", weight_name]
        weight_kn = value  # [K, N]
        y_shape = [*lead, n]
    else:
        x_shape = (*lead[:-1], k, lead[-1]) if lead else (k,)
        inputs = [weight_name, "X"]
        weight_kn = value.T  # [K, N]
        y_shape = [*lead[:-1], n, lead[-1]] if lead else [n]
    nodes.append(helper.make_node("MatMul", inputs, ["Y"], name=name))
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("X", dtype, list(x_shape))],
        [helper.make_tensor_value_info("Y", dtype, y_shape)],
        tensors,
        opset=opset,
        ir_version=ir_version,
    )
    return Case(model, {"X": _activation(rng, x_shape, dtype)}, {name: weight_kn})


def gemm_case(
    rng: np.random.Generator,
    m: int,
    k: int,
    n: int,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: str = "none",
    weight_as: str = "B",
    source: str = "initializer",
    opset: int = OPSET,
    name: str = "gemm",
) -> Case:
    """``Y = α·op(A)·op(B) + β·C`` with ``op(A)`` ``[M, K]``, ``op(B)`` ``[K, N]``, ``Y`` ``[M, N]``.

    ``weight_as="B"``: B is the constant (normal form ``[K, N]``, ``W_kn = α·op(B)``).
    ``weight_as="A"``: A is the constant (the mirror; normal form ``[K, M]``, ``W_kn = (α·op(A))ᵀ``).
    """
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    attrs: dict[str, float | int] = {}
    if trans_a:
        attrs["transA"] = 1
    if trans_b:
        attrs["transB"] = 1
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    if weight_as == "B":
        nodes, tensors, weight_name, value = weight_source(rng, "W", b_shape, source)
        inputs = ["X", weight_name]
        x_shape = a_shape
        weight_kn = alpha * (value.T if trans_b else value)  # [K, N]
    else:
        nodes, tensors, weight_name, value = weight_source(rng, "W", a_shape, source)
        inputs = [weight_name, "X"]
        x_shape = b_shape
        weight_kn = (alpha * (value.T if trans_a else value)).T  # [K, M]
    bias_shape = {"none": None, "scalar": (), "n": (n,), "1n": (1, n), "mn": (m, n)}[bias]
    if bias_shape is not None:
        tensors.append(numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "C"))
        inputs.append("C")
    nodes.append(helper.make_node("Gemm", inputs, ["Y"], name=name, **attrs))
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        tensors,
        opset=opset,
    )
    return Case(model, {"X": _activation(rng, x_shape, TensorProto.FLOAT)}, {name: weight_kn})


def shared_weight_case(rng: np.random.Generator, k: int = 24, n: int = 16) -> Case:
    """One initializer ``W`` ``[K, N]`` read by two MatMul nodes ``Y1 = X1·W`` and ``Y2 = X2·W``."""
    weight = rng.standard_normal((k, n)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["X1", "W"], ["Y1"], name="first"),
        helper.make_node("MatMul", ["X2", "W"], ["Y2"], name="second"),
    ]
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("X1", TensorProto.FLOAT, [4, k]),
            helper.make_tensor_value_info("X2", TensorProto.FLOAT, [2, 5, k]),
        ],
        [
            helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [4, n]),
            helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [2, 5, n]),
        ],
        [numpy_helper.from_array(weight, "W")],
    )
    feeds = {
        "X1": _activation(rng, (4, k), TensorProto.FLOAT),
        "X2": _activation(rng, (2, 5, k), TensorProto.FLOAT),
    }
    return Case(model, feeds, {"first": weight.astype(np.float64), "second": weight.astype(np.float64)})


def identity_shared_case(rng: np.random.Generator, dim: int = 48, layers: int = 4) -> Case:
    """Weights shared across layers through separate ``Identity`` nodes, as some exporters write them.

    Two stored weights ``Wa``, ``Wb`` ``[D, D]`` serve every layer: per layer ``h ← relu(h · Identity(Wa))``,
    ``h ← h · Identity(Wb)`` and ``h ← h · Transpose(Identity(Wb))``. ``3·layers`` MatMul nodes read two
    stored weights, each through its own chain; ``X`` is ``[2, 5, D]``.
    """
    wa = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    wb = (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    nodes: list[onnx.NodeProto] = []
    hidden = "X"
    for layer in range(layers):
        uses = [("a", "Wa", False), ("b", "Wb", False), ("bt", "Wb", True)]
        for tag, stored, transposed in uses:
            read = f"{stored}_id{layer}{tag}"
            nodes.append(helper.make_node("Identity", [stored], [read], name=f"identity{layer}{tag}"))
            if transposed:
                nodes.append(helper.make_node("Transpose", [read], [f"{read}_t"], name=f"transpose{layer}{tag}"))
                read = f"{read}_t"
            out = f"h{layer}{tag}"
            nodes.append(helper.make_node("MatMul", [hidden, read], [out], name=f"layer{layer}/{tag}"))
            hidden = out
            if tag == "a":
                nodes.append(helper.make_node("Relu", [hidden], [f"{hidden}_relu"], name=f"relu{layer}"))
                hidden = f"{hidden}_relu"
    nodes.append(helper.make_node("Identity", [hidden], ["Y"], name="output"))
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 5, dim])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 5, dim])],
        [numpy_helper.from_array(wa, "Wa"), numpy_helper.from_array(wb, "Wb")],
    )
    weights = {}
    for layer in range(layers):
        weights[f"layer{layer}/a"] = wa.astype(np.float64)
        weights[f"layer{layer}/b"] = wb.astype(np.float64)
        weights[f"layer{layer}/bt"] = wb.T.astype(np.float64)
    return Case(model, {"X": _activation(rng, (2, 5, dim), TensorProto.FLOAT)}, weights)


def tied_embedding_case(rng: np.random.Generator, vocab: int = 20, dim: int = 12) -> Case:
    """A tied embedding: ``E`` ``[V, D]`` is read by ``Gather`` (lookup) and, transposed, by the output
    projection ``logits = H · Eᵀ`` — which cannot be factorized without keeping the dense copy."""
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["H"], name="lookup"),
        helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["H", "Et"], ["logits"], name="project"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, vocab])],
        [numpy_helper.from_array(table, "E")],
    )
    return Case(model, {"ids": np.array([0, 5, 19], dtype=np.int64)}, {"project": table.T.astype(np.float64)})


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of ``model`` through ONNX Runtime on the CPU, one thread.

    Basic graph optimizations only: the extended ones fuse ``DequantizeLinear → MatMul`` into a kernel
    that quantizes the activations too, which would change the reference, not the rewrite.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual − expected| / max|expected|`` in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    error = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    return error / scale if scale > 0 else error


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every If/Loop/Scan body in it, at any depth."""
    found = [graph]
    for node in graph.node:
        for attribute in node.attribute:
            for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                found.extend(_graphs(body))
    return found


def unused_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers of the main graph or of any body that no node in any scope reads."""
    graphs = _graphs(model.graph)
    read = {name for graph in graphs for node in graph.node for name in node.input}
    read |= {value.name for graph in graphs for value in graph.output}
    return [tensor.name for graph in graphs for tensor in graph.initializer if tensor.name not in read]


def assert_valid(model: onnx.ModelProto) -> None:
    """The full checker, strict shape inference, and no initializer left unread."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert unused_initializers(model) == []
