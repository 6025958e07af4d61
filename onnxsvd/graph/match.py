"""Finding sites: MatMul and Gemm nodes with one constant 2-D weight, in one normal form.

Every site is normalised to ``Y = X · W (+ bias)`` with ``W`` of shape ``[K, N]`` and ``X`` ``[..., K]``:

- ``MatMul(X, W)``: as is. ``MatMul(W, X)`` (weight on the left, ``W`` ``[P, Q]``): the transposed
  problem ``Yᵀ = Xᵀ Wᵀ``, so ``K = Q``, ``N = P`` and ``W_kn = Wᵀ``; the emitter writes the mirror chain.
- ``Gemm(A, B, C)``: ``Y = α·op(A)·op(B) + β·C``. With ``B`` constant, ``W_kn = α·op(B)`` (``transB=1``
  stores ``[N, K]``) and ``transA`` stays on the activation. With ``A`` constant it is the mirror case,
  ``W_kn = (α·op(A))ᵀ``, and ``transB`` stays on the activation. ``C`` and ``β`` stay on the last node.

A ``Conv`` with a constant weight ``[N, C/g, k…]`` (1-D, 2-D or 3-D, ``group`` 1) is a site too, with the
weight as a matrix (:class:`ConvGeometry` records the rest, what the emitter needs): in the *channel* form
``W_kn = reshape(weight, [N, C·∏k])ᵀ`` (``K = C·∏k``: one row per entry of an im2col patch, channel-major),
in the *spatial* form (2-D kernels with ``k_h > 1`` and ``k_w > 1``) ``W_kn[(c, i), (j, n)] = weight[n, c, i, j]``
(``[C·k_h, k_w·N]``). Grouped and depthwise Convs, and ConvTranspose, are skips with their reasons.

The constant is an initializer or a ``Constant`` node, possibly behind ``Transpose``, ``Cast``,
``Identity``, ``DequantizeLinear``, ``Reshape`` (to a constant shape) or ``Mul``/``Div`` by a constant
scale (weight-only int8: ``int8 → Cast → Mul(scale)``). Anything else is a :class:`Skip` with its reason.

Sharing is decided on the stored constant: every site whose chain applies the same value operations
(casts, scales, dequantization, reshapes) to the same stored tensor is in one *group*, whatever
``Identity`` and ``Transpose`` nodes lie between, and is factorized once. Within a group a site's
``W_kn`` is either the group's value ``V`` or ``Vᵀ`` (:attr:`Site.kn_transposed`): the first site's
orientation is the one factorized, and the others read the same factors from the other end.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxsvd.config import RewriteConfig
from onnxsvd.io import tensor_bytes

__all__ = [
    "SITE_OPS",
    "CONV_OPS",
    "CHAIN_OPS",
    "WEIGHT_HOLDER_REASONS",
    "MIN_WEIGHT_ELEMENTS",
    "WeightSource",
    "ConvGeometry",
    "Site",
    "Skip",
    "Match",
    "GraphIndex",
    "find_sites",
    "load_weight",
    "conv_matrix",
    "conv_kernel",
    "conv_site_in_form",
    "node_name",
    "dtype_name",
]

#: Ops that can be sites, and ops allowed between a stored constant and the site.
SITE_OPS = ("MatMul", "Gemm")
#: Convolutions that can be sites (see :class:`ConvGeometry`).
CONV_OPS = ("Conv",)
CHAIN_OPS = ("Transpose", "Cast", "Identity", "DequantizeLinear", "Reshape", "Mul", "Div")
#: Ops that hold constant weights but are not sites (yet), and what ``inspect`` and the report say.
WEIGHT_HOLDER_REASONS = {
    "Conv": "Conv sites inside If/Loop/Scan bodies are not supported yet",
    "ConvTranspose": "ConvTranspose weights are not a site (its factors would need a transposed chain)",
    "LSTM": "LSTM weights are not a site yet",
    "GRU": "GRU weights are not a site yet",
    "RNN": "RNN weights are not a site yet",
    "Attention": "fused Attention weights are not a site yet",
    "Einsum": "Einsum with a constant operand is not a site yet",
    "MatMulInteger": "MatMulInteger (integer product) weights are not a site",
    "ConvInteger": "ConvInteger (integer product) weights are not a site",
    "QLinearMatMul": "QLinearMatMul (quantized product) weights are not a site",
    "QLinearConv": "QLinearConv (quantized product) weights are not a site",
    "MatMulNBits": "MatMulNBits weights are already packed in low-bit blocks; not a site",
    "Gather": "an embedding table is looked up (Gather), not multiplied; not a site",
}
#: A constant input counts as a weight from this many values and two dimensions (shape tensors, biases
#: and scalars do not).
MIN_WEIGHT_ELEMENTS = 64
FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
)


_T = onnx.TensorProto
#: Casts every value of whose source dtype is exact in the target: uses that widen a weight (fp16 → fp32)
#: share its factors with the uses that read it as stored.
_EXACT_CASTS = {
    (_T.FLOAT16, _T.FLOAT), (_T.FLOAT16, _T.DOUBLE), (_T.BFLOAT16, _T.FLOAT), (_T.BFLOAT16, _T.DOUBLE),
    (_T.FLOAT, _T.DOUBLE),
    *((small, wide) for small in (_T.INT8, _T.UINT8) for wide in (_T.FLOAT16, _T.BFLOAT16, _T.FLOAT, _T.DOUBLE)),
}

#: Short names of the float dtypes, as the CLI spells them (``--dtype fp16``).
_FLOAT_NAMES = {
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.DOUBLE: "fp64",
}


def dtype_name(data_type: int) -> str:
    """``fp32``, ``fp16``, ``bf16``, ``fp64``, or the ONNX name in lower case (``int8``, ``uint4``)."""
    if data_type in _FLOAT_NAMES:
        return _FLOAT_NAMES[data_type]
    return onnx.helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a deterministic one (``MatMul_12``) when the exporter left it empty."""
    return node.name or f"{node.op_type}_{index}"


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where a site's constant weight is stored and how it reaches the node.

    Attributes:
        tensor: name of the initializer or ``Constant`` output that stores the value.
        chain: indices of the chain nodes (:data:`CHAIN_OPS`) from the stored tensor to the site, nearest
            the storage first.
        storage_dtype: ONNX dtype of the stored tensor.
        compute_dtype: ONNX dtype the site consumes.
        shape: the weight's shape as the site consumes it (2-D).
        stored_bytes: bytes of the weight as stored: the stored tensor in its own dtype (one byte per
            int8 value, two per fp16), plus the scale and zero point of each ``DequantizeLinear`` and the
            scale of each ``Mul``/``Div``.
    """

    tensor: str
    chain: tuple[int, ...]
    storage_dtype: int
    compute_dtype: int
    shape: tuple[int, ...]
    stored_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What a Conv site's emitter and its patch statistics need besides the matrix.

    Attributes:
        form: ``"channel"`` (a k×k Conv to r channels, then a 1×1 Conv) or ``"spatial"`` (a ``k_h×1`` Conv,
            then a ``1×k_w`` Conv; 2-D only).
        in_channels: C.
        out_channels: N.
        kernel: the kernel's spatial shape ``(k…)``.
        strides: per spatial axis.
        pads: ``[begin…, end…]`` as ONNX lists them (zeros under an ``auto_pad`` other than ``NOTSET``).
        auto_pad: ``"NOTSET"``, ``"SAME_UPPER"``, ``"SAME_LOWER"`` or ``"VALID"``.
        dilations: per spatial axis.
        spatial_applies: whether the spatial form applies (2-D, ``k_h > 1`` and ``k_w > 1``).
        note: why the form asked for (``--conv spatial``) was not used, else empty.
    """

    form: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    dilations: tuple[int, ...]
    spatial_applies: bool
    note: str = ""

    @property
    def patch_size(self) -> int:
        """``C·∏k``: entries of one im2col patch, the channel form's K."""
        return self.in_channels * _elements(self.kernel)

    @property
    def patch_key(self) -> str:
        """What makes two Convs' patches of one input the same: kernel, strides, padding, dilations."""
        pads = self.auto_pad if self.auto_pad != "NOTSET" else ",".join(map(str, self.pads))
        return (
            f"k={','.join(map(str, self.kernel))};s={','.join(map(str, self.strides))};p={pads};"
            f"d={','.join(map(str, self.dilations))}"
        )

    def shape_in(self, form: str) -> tuple[int, int]:
        """``(K, N)`` of the matrix in ``form``."""
        if form == "spatial":
            return self.in_channels * self.kernel[0], self.kernel[1] * self.out_channels
        return self.patch_size, self.out_channels


@dataclasses.dataclass(frozen=True)
class Site:
    """One MatMul/Gemm with a constant weight, in the normal form ``Y = X · W_kn (+ bias)``.

    Attributes:
        name: node name (deterministic when the exporter left it empty).
        op_type: ``"MatMul"`` or ``"Gemm"``.
        node_index: position of the node in ``graph.node``.
        activation: name of the dynamic input as the node reads it.
        output: name of the node's output.
        weight: where the constant comes from.
        weight_side: ``"right"`` (``X · W``) or ``"left"`` (``W · X``, the mirror case).
        k: input channels of the normal form.
        n: output channels of the normal form.
        transpose_weight: the stored-as-consumed weight is transposed to reach ``W_kn``.
        transpose_activation: Gemm's ``transA`` (right) or ``transB`` (left) on the activation.
        alpha: Gemm's α, folded into ``W_kn``.
        beta: Gemm's β, kept on the last node with ``C``.
        bias: Gemm's ``C`` input name, or None.
        group: key shared by sites that consume the same stored weight through the same value operations
            (factorized once, factors shared), whatever ``Identity``/``Transpose`` nodes lie between.
        kn_transposed: ``W_kn`` is the transpose of the group's value as stored (after the chain's value
            operations, before its 2-D transposes). Sites of a group that differ in it read the group's
            factors from opposite ends: ``W_knᵀ ≈ Bᵀ·Aᵀ``.
        conv: the geometry of a Conv site (``op_type == "Conv"``), else None.
    """

    name: str
    op_type: str
    node_index: int
    activation: str
    output: str
    weight: WeightSource
    weight_side: str
    k: int
    n: int
    transpose_weight: bool
    transpose_activation: bool
    alpha: float
    beta: float
    bias: str | None
    group: str
    kn_transposed: bool = False
    conv: ConvGeometry | None = None

    @property
    def params(self) -> int:
        """Parameters of the dense weight, ``K·N``."""
        return self.k * self.n

    @property
    def dense_bytes(self) -> int:
        """Bytes of the dense weight as stored (see :attr:`WeightSource.stored_bytes`)."""
        return self.weight.stored_bytes

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, N)``."""
        return (self.k, self.n)

    @property
    def channel_axis(self) -> int:
        """Axis of the activation tensor (as the node reads it) that holds the K channels.

        ``-1`` for ``X · W``; ``1`` for a Conv (``[B, C, …]``; its rows are im2col patches); ``-2`` when
        the activation is read transposed: Gemm ``transA`` with the
        weight on the right, or ``W · X`` (MatMul's ``[..., K, S]``, Gemm's ``B`` without ``transB``).
        """
        if self.conv is not None:
            return 1
        if self.weight_side == "right":
            return -2 if self.transpose_activation else -1
        return -1 if self.transpose_activation else -2

    @property
    def statistics_key(self) -> str:
        """Key of this site's activation statistics: the tensor name, marked when read transposed; for a
        Conv, marked with its patch geometry (the statistics are those of the channel form's patches,
        whatever the site's form)."""
        if self.conv is not None:
            return f"{self.activation}#patches={self.conv.patch_key}"
        return self.activation if self.channel_axis == -1 else f"{self.activation}#channels=-2"


@dataclasses.dataclass(frozen=True)
class Skip:
    """A node that holds or reads a weight but is not a site, with the reason (shown by ``inspect``,
    listed in reports).

    Attributes:
        name: node name; inside an If/Loop/Scan body, the path ``<outer node>/<attribute>/<node>``.
        op_type: the node's op.
        node_index: position in ``graph.node`` of the node, or of the main-graph node holding its body.
        reason: why it is not a site.
        shape: the weight's shape (the largest constant input of a weight-holding node), or None.
        dense_bytes: bytes of the weights as stored when the node has constant ones (a site left out by a
            filter or a shared weight; every constant input of a weight-holding node), else 0.
        kind: ``"matmul"`` (a MatMul/Gemm of the main graph), ``"weights"`` (another op with constant
            weights: LSTM, Conv, MatMulInteger…) or ``"subgraph"`` (a node inside an If/Loop/Scan body).
        scope: where a node inside a body is (``"then_branch of If 'gate'"``), else empty.
        params: values in the node's constant weights (0 when it has none; ``K·N`` of a site left out).
        weights: names of the stored tensors those values are in.
    """

    name: str
    op_type: str
    node_index: int
    reason: str
    shape: tuple[int, ...] | None = None
    dense_bytes: int = 0
    kind: str = "matmul"
    scope: str = ""
    params: int = 0
    weights: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Match:
    """The result of matching a graph: sites to consider and nodes skipped, both in graph order."""

    sites: tuple[Site, ...]
    skips: tuple[Skip, ...]


class GraphIndex:
    """Producers, consumers and constants of a graph, built once per pass.

    The use-def links come from onnx-ir: each name's producer is ``ir.Value.producer()`` and its
    consumers are ``ir.Value.uses()``. onnx-ir resolves a name that an If/Loop/Scan body reads from the
    outer scope to the outer value itself, so such a read counts as one by the node that holds the body.
    Positions are indices in ``graph.node``. Building the onnx-ir graph wraps the tensors; nothing is
    copied, and external data is not read.

    Attributes:
        reads: per position, every name the node reads: its inputs and what its bodies read from outside.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs = {value.name for value in graph.input}
        self.graph_outputs = {value.name for value in graph.output}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)  # each reading node once, in graph order
        self.reads: list[set[str]] = [set() for _ in graph.node]
        linked = ir.serde.deserialize_graph(graph)
        position: dict[int, int] = {}  # id(ir node), its body nodes' at any depth too → index in graph.node
        for index, node in enumerate(linked):
            position[id(node)] = index
            for body in node_bodies(node):
                for inner in ir.traversal.RecursiveGraphIterator(body):
                    position[id(inner)] = index
        values = [*linked.inputs, *linked.initializers.values()]
        values += [value for node in linked for value in node.outputs]
        for value in values:
            if not value.name:
                continue
            producer = value.producer()
            if producer is not None:
                self.producer[value.name] = position[id(producer)]
            readers = sorted({position[id(use.node)] for use in value.uses()})
            if readers:
                self.consumers[value.name] = readers
            for reader in readers:
                self.reads[reader].add(value.name)

    def needed(self, names: Iterable[str]) -> tuple[list[int], set[str]]:
        """What computing ``names`` takes: the positions of the nodes it needs (in graph order), and every
        name those nodes read (so the initializers to keep), outer-scope reads of their bodies included."""
        needed = set(names)
        keep: list[int] = []
        for position in reversed(range(len(self.graph.node))):
            if any(name in needed for name in self.graph.node[position].output):
                keep.append(position)
                needed |= self.reads[position]
        keep.reverse()
        return keep, needed

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        """The stored tensor behind ``name`` if it is an initializer or a ``Constant`` node's value."""
        if name in self.initializers and name not in self.graph_inputs:
            return self.initializers[name]
        producer = self.producer.get(name)
        if producer is not None:
            node = self.graph.node[producer]
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        return attribute.t
        return None

    def is_constant(self, name: str) -> bool:
        """True if ``name`` is a constant or a chain of supported ops over one."""
        return self.trace(name) is not None

    def producer_node(self, name: str) -> tuple[int, onnx.NodeProto] | None:
        """``(index in graph.node, node)`` of the node that writes ``name``, or None."""
        position = self.producer.get(name)
        return None if position is None else (position, self.graph.node[position])

    def trace(self, name: str) -> tuple[str, onnx.TensorProto, tuple[int, ...]] | None:
        """Follow ``name`` back through chain ops to a stored constant: (stored name, tensor, chain)."""
        found = trace_constant(name, self.constant_tensor, self.producer_node)
        if found is None:
            return None
        stored_name, stored, chain = found
        if _chain_shape(stored, [self.graph.node[p] for p in chain], self.constant_tensor) is None:
            return None  # a Reshape or a scale that does not fit the weight: not a weight chain
        return stored_name, stored, chain


def _value_input(node: onnx.NodeProto, constant_tensor: Callable[[str], onnx.TensorProto | None]) -> int | None:
    """Which input of chain node ``node`` carries the weight (the others must be constants), or None."""
    if node.op_type not in CHAIN_OPS or not node.input or not node.input[0]:
        return None
    extras_constant = all(constant_tensor(extra) is not None for extra in node.input[1:] if extra)
    if node.op_type == "DequantizeLinear":
        return 0 if extras_constant else None
    if node.op_type in ("Reshape", "Div"):
        return 0 if len(node.input) >= 2 and constant_tensor(node.input[1]) is not None else None
    if node.op_type == "Mul":
        if len(node.input) != 2 or not node.input[1]:
            return None
        left, right = constant_tensor(node.input[0]), constant_tensor(node.input[1])
        if left is not None and right is not None:  # both stored: the larger one is the weight
            return 1 if _elements(right.dims) > _elements(left.dims) else 0
        if right is not None:
            return 0
        return 1 if left is not None else None
    return 0


def trace_constant(
    name: str,
    constant_tensor: Callable[[str], onnx.TensorProto | None],
    producer: Callable[[str], tuple[Any, onnx.NodeProto] | None],
) -> tuple[str, onnx.TensorProto, tuple[Any, ...]] | None:
    """Follow ``name`` back through chain ops to a stored constant in any scope.

    Args:
        name: the tensor a node reads.
        constant_tensor: the stored tensor behind a name (initializer or ``Constant``), or None.
        producer: ``(key, node)`` of the node writing a name, or None.

    Returns:
        (stored name, stored tensor, the chain nodes' keys nearest the storage first), or None.
    """
    chain: list[Any] = []
    current = name
    for _ in range(32):
        tensor = constant_tensor(current)
        if tensor is not None:
            return current, tensor, tuple(reversed(chain))
        found = producer(current)
        if found is None:
            return None
        key, node = found
        value_input = _value_input(node, constant_tensor)
        if value_input is None:
            return None
        chain.append(key)
        current = node.input[value_input]
    return None


def node_bodies(node: ir.Node) -> list[ir.Graph]:
    """The subgraphs (If branches, Loop and Scan bodies) held by ``node``'s attributes."""
    bodies: list[ir.Graph] = []
    for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
            bodies.append(attribute.as_graph())
        elif attribute.type == ir.AttributeType.GRAPHS:
            bodies.extend(attribute.as_graphs())
    return bodies


def _attribute(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _stored_array(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    return numpy_helper.to_array(tensor, base_dir or "")


def _elements(dims: Iterable[int]) -> int:
    count = 1
    for dim in dims:
        count *= int(dim)
    return count


def _dtype_of(index: GraphIndex, stored: onnx.TensorProto, chain: tuple[int, ...]) -> int:
    """The ONNX dtype that comes out of the chain (Mul/Div/Reshape/Transpose keep it)."""
    dtype = stored.data_type
    for position in chain:
        node = index.graph.node[position]
        if node.op_type == "Cast":
            dtype = int(_attribute(node, "to", dtype))
        elif node.op_type == "DequantizeLinear":
            scale = index.constant_tensor(node.input[1])
            dtype = scale.data_type if scale is not None else onnx.TensorProto.FLOAT
            dtype = int(_attribute(node, "output_dtype", 0)) or dtype
    return dtype


def _scale_inputs(node: onnx.NodeProto, constant_tensor: Callable[[str], onnx.TensorProto | None]) -> list[str]:
    """The constant inputs of a chain node that are part of the weight: DequantizeLinear's scale and zero
    point, Mul's or Div's scale (not Reshape's shape)."""
    if node.op_type == "DequantizeLinear":
        return [name for name in node.input[1:] if name]
    if node.op_type in ("Mul", "Div"):
        value_input = _value_input(node, constant_tensor)
        return [] if value_input is None else [node.input[1 - value_input]]
    return []


def _stored_bytes(index: GraphIndex, stored: onnx.TensorProto, chain: tuple[int, ...]) -> int:
    """The stored tensor's bytes plus those of every scale and zero point on the way."""
    total = tensor_bytes(stored)
    for position in chain:
        node = index.graph.node[position]
        extras = (index.constant_tensor(name) for name in _scale_inputs(node, index.constant_tensor))
        total += sum(tensor_bytes(extra) for extra in extras if extra is not None)
    return total


def _reshape_target(shape: tuple[int, ...], requested: Iterable[int], allow_zero: bool) -> tuple[int, ...] | None:
    """Reshape's output shape for an input of ``shape`` (``0`` copies a dimension unless ``allowzero``,
    ``-1`` is inferred), or None when it does not fit."""
    target = [int(d) for d in requested]
    if not allow_zero:
        target = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(target)]
    if target.count(-1) > 1 or any(d < -1 for d in target):
        return None
    known = _elements(d for d in target if d != -1)
    total = _elements(shape)
    if -1 in target:
        if known == 0 or total % known:
            return None
        target[target.index(-1)] = total // known
    return tuple(target) if _elements(target) == total else None


def _reshape_request(
    node: onnx.NodeProto, constant_tensor: Callable[[str], onnx.TensorProto | None]
) -> list[int] | None:
    """Reshape's requested shape, when it is a constant stored in the model."""
    tensor = constant_tensor(node.input[1])
    if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return [int(d) for d in numpy_helper.to_array(tensor).reshape(-1)]


def _chain_shape(
    stored: onnx.TensorProto,
    nodes: Iterable[onnx.NodeProto],
    constant_tensor: Callable[[str], onnx.TensorProto | None],
) -> tuple[int, ...] | None:
    """The weight's shape after ``nodes``, or None where a Reshape or a scale does not fit it (a ``Mul`` by
    a constant that broadcasts the weight to a larger shape is no weight chain)."""
    shape = tuple(int(d) for d in stored.dims)
    for node in nodes:
        if node.op_type == "Transpose":
            perm = _attribute(node, "perm", None)  # type: ignore[arg-type]
            perm = list(perm) if perm is not None else list(reversed(range(len(shape))))
            if sorted(perm) != list(range(len(shape))):
                return None
            shape = tuple(shape[p] for p in perm)
        elif node.op_type == "Reshape":
            requested = _reshape_request(node, constant_tensor)
            allow_zero = bool(_attribute(node, "allowzero", 0))
            target = None if requested is None else _reshape_target(shape, requested, allow_zero)
            if target is None:
                return None
            shape = target
        elif node.op_type in ("Mul", "Div"):
            (scale_name,) = _scale_inputs(node, constant_tensor)
            scale = constant_tensor(scale_name)
            try:
                broadcast = np.broadcast_shapes(shape, tuple(int(d) for d in scale.dims))  # type: ignore[union-attr]
            except ValueError:
                return None
            if tuple(broadcast) != shape:
                return None
    return shape


def _shape_of(index: GraphIndex, stored: onnx.TensorProto, chain: tuple[int, ...]) -> tuple[int, ...]:
    shape = _chain_shape(stored, [index.graph.node[p] for p in chain], index.constant_tensor)
    assert shape is not None, "trace() accepts only chains whose shapes fit"
    return shape


def _value_signature(index: GraphIndex, stored: onnx.TensorProto, chain: tuple[int, ...]) -> tuple[str, bool]:
    """What the chain does to the stored value, less its ``Identity`` nodes and 2-D transposes; and
    whether those transposes leave the value transposed.

    Two chains with one signature over one stored tensor give the same value, or its transpose (in maybe
    different dtypes: a Cast that widens exactly, :data:`_EXACT_CASTS`, is left out; the ops after it
    compute alike, since their constants' dtypes, hence names, would differ otherwise). Casts, scalar
    scales and per-tensor dequantization commute with a transpose; a per-axis scale or
    dequantization records whether the value was transposed when it applied, and a Reshape records it too
    and starts a fresh frame. The signature never merges different values; it may keep apart some equal
    ones (a per-axis scale applied on either side of a transpose).
    """
    steps: list[tuple] = []
    flipped = False
    shape = tuple(int(d) for d in stored.dims)
    dtype = stored.data_type
    for position in chain:
        node = index.graph.node[position]
        op = node.op_type
        if op == "Identity":
            continue
        if op == "Transpose":
            perm = _attribute(node, "perm", None)  # type: ignore[arg-type]
            perm = list(perm) if perm is not None else list(reversed(range(len(shape))))
            if perm == list(range(len(shape))):
                continue
            shape = tuple(shape[p] for p in perm)
            if len(shape) == 2:
                flipped = not flipped
            else:
                steps.append(("Transpose", tuple(perm)))
        elif op == "Cast":
            target = int(_attribute(node, "to", 0))
            if (dtype, target) not in _EXACT_CASTS and dtype != target:
                steps.append(("Cast", target))
            dtype = target
        elif op == "Reshape":
            requested = _reshape_request(node, index.constant_tensor) or []
            target = _reshape_target(shape, requested, bool(_attribute(node, "allowzero", 0)))
            steps.append(("Reshape", flipped, shape, target))
            flipped, shape = False, target or shape
        else:  # DequantizeLinear, Mul, Div: elementwise with constant scales
            if op == "DequantizeLinear":
                dtype = _dtype_of(index, stored, (position,))
            extras = _scale_inputs(node, index.constant_tensor)
            sizes = [_elements(index.constant_tensor(name).dims) for name in extras]  # type: ignore[union-attr]
            per_tensor = all(size == 1 for size in sizes)
            attributes = tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in node.attribute))
            steps.append((op, tuple(extras), attributes, None if per_tensor else flipped))
    return repr(tuple(steps)), flipped


def load_weight(index: GraphIndex, site: Site, base_dir: str | None = None) -> np.ndarray:
    """The site's normal-form weight ``W_kn`` ``[K, N]`` in float64 (chain applied, α folded).

    Args:
        index: the graph index the site was matched in.
        site: the site.
        base_dir: folder of the model file, for tensors stored as external data.
    """
    stored = index.constant_tensor(site.weight.tensor)
    assert stored is not None
    value = _stored_array(stored, base_dir)
    for position in site.weight.chain:
        value = _apply_chain_node(index, index.graph.node[position], value, base_dir)
    matrix = np.asarray(value).astype(np.float64)  # as consumed: [K, N], [N, K], or the mirror's
    if site.conv is not None:
        return conv_matrix(matrix, site.conv.form)  # [K, N]
    if site.transpose_weight:
        matrix = matrix.T  # [K, N]
    return site.alpha * matrix if site.alpha != 1.0 else matrix


def conv_matrix(weight: np.ndarray, form: str) -> np.ndarray:
    """A Conv weight ``[N, C, k…]`` as the matrix of ``form``.

    channel: ``[C·∏k, N]``, row ``(c, k…)`` in the weight's own order (an im2col patch's).
    spatial (2-D): ``[C·k_h, k_w·N]`` with ``W[(c, i), (j, n)] = weight[n, c, i, j]``.
    """
    n = weight.shape[0]
    if form == "spatial":
        _, c, k_h, k_w = weight.shape
        return np.ascontiguousarray(weight.transpose(1, 2, 3, 0).reshape(c * k_h, k_w * n))  # [C·k_h, k_w·N]
    return np.ascontiguousarray(weight.reshape(n, -1).T)  # [C·∏k, N]


def conv_kernel(matrix: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The Conv weight ``[N, C, k…]`` back from its matrix in ``geometry.form`` (the inverse of
    :func:`conv_matrix`)."""
    n, c = geometry.out_channels, geometry.in_channels
    if geometry.form == "spatial":
        k_h, k_w = geometry.kernel
        return np.ascontiguousarray(matrix.reshape(c, k_h, k_w, n).transpose(3, 0, 1, 2))  # [N, C, k_h, k_w]
    return np.ascontiguousarray(matrix.T.reshape(n, c, *geometry.kernel))  # [N, C, k…]


def conv_site_in_form(site: Site, form: str) -> Site:
    """The Conv site ``site`` factored in ``form`` (``"channel"`` or ``"spatial"``): its shape and group."""
    assert site.conv is not None and (form == "channel" or site.conv.spatial_applies)
    k, n = site.conv.shape_in(form)
    group = site.group.rsplit("|conv:", 1)[0] + f"|conv:{form}"
    return dataclasses.replace(site, k=k, n=n, group=group, conv=dataclasses.replace(site.conv, form=form))


def _apply_chain_node(index: GraphIndex, node: onnx.NodeProto, value: np.ndarray, base_dir: str | None) -> np.ndarray:
    if node.op_type == "Identity":
        return value
    if node.op_type == "Transpose":
        perm = _attribute(node, "perm", None)  # type: ignore[arg-type]
        return np.transpose(value, list(perm) if perm is not None else None)
    if node.op_type == "Cast":
        target = onnx.helper.tensor_dtype_to_np_dtype(int(_attribute(node, "to", 1)))
        return value.astype(target)
    if node.op_type == "Reshape":
        requested = _reshape_request(node, index.constant_tensor) or []
        target = _reshape_target(value.shape, requested, bool(_attribute(node, "allowzero", 0)))
        return value.reshape(target)
    if node.op_type in ("Mul", "Div"):
        # In the value's own dtype, as the model computes it: the loaded weight is the one it multiplies by.
        (scale_name,) = _scale_inputs(node, index.constant_tensor)
        scale = _stored_array(index.constant_tensor(scale_name), base_dir).astype(value.dtype)
        return value * scale if node.op_type == "Mul" else value / scale
    # DequantizeLinear: y = (x − zero_point) · scale, per tensor or along ``axis``.
    scale = _stored_array(index.constant_tensor(node.input[1]), base_dir).astype(np.float64)
    zero = (
        _stored_array(index.constant_tensor(node.input[2]), base_dir).astype(np.float64)
        if len(node.input) > 2 and node.input[2]
        else np.zeros_like(scale)
    )
    values = value.astype(np.float64)
    axis = int(_attribute(node, "axis", 1)) % values.ndim
    block = int(_attribute(node, "block_size", 0))
    if block > 0:
        # Blocked (opset 21): one scale per ``block`` entries along ``axis``, the last block maybe short.
        blocks = np.arange(values.shape[axis]) // block  # [D]: the block of each index along axis
        scale, zero = np.take(scale, blocks, axis=axis), np.take(zero, blocks, axis=axis)
    elif scale.ndim == 1 and scale.size > 1:
        shape = [1] * values.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (values - zero) * scale


def find_sites(model: onnx.ModelProto, config: RewriteConfig | None = None) -> Match:
    """Match every MatMul/Gemm of the main graph: a :class:`Site` or a :class:`Skip` with its reason.

    ``config`` applies ``--include``/``--exclude``/``--min-params`` as skips. Sites that share a stored
    weight with a consumer that is not rewritten are skips too: their dense copy would stay.
    """
    config = config or RewriteConfig()
    index = GraphIndex(model.graph)
    sites: list[Site] = []
    skips: list[Skip] = []
    for position, node in enumerate(model.graph.node):
        if node.op_type in CONV_OPS:
            result = _match_conv(index, node, position, config.conv)
        elif node.op_type in SITE_OPS:
            result = _match_node(index, node, position)
        else:
            continue
        if isinstance(result, Skip):
            skips.append(result)
            continue
        reason = _filter_reason(result, config)
        if reason:
            skips.append(Skip(result.name, result.op_type, position, reason, result.shape, result.dense_bytes))
        else:
            sites.append(result)
    kept_sites, shared_skips = _drop_shared_with_dense(index, sites)
    skips.extend(shared_skips)
    skips.extend(_weight_holder_skips(index))
    skips.extend(_subgraph_skips(index))
    skips.sort(key=lambda skip: skip.node_index)  # stable: a body's nodes stay in their order
    return Match(sites=tuple(kept_sites), skips=tuple(skips))


def _holder_reason(op_type: str) -> str:
    return WEIGHT_HOLDER_REASONS.get(op_type, f"{op_type} reads a constant weight; only MatMul and Gemm are sites")


def _constant_weights(
    node: onnx.NodeProto,
    trace: Callable[[str], tuple[str, onnx.TensorProto, tuple[Any, ...]] | None],
) -> dict[str, onnx.TensorProto]:
    """The stored tensors of ``node``'s inputs that are weights: constants (through chains) of at least
    two dimensions and :data:`MIN_WEIGHT_ELEMENTS` values."""
    found: dict[str, onnx.TensorProto] = {}
    for name in node.input:
        traced = trace(name) if name else None
        if traced is None:
            continue
        stored_name, stored, _ = traced
        if len(stored.dims) >= 2 and _elements(stored.dims) >= MIN_WEIGHT_ELEMENTS:
            found.setdefault(stored_name, stored)
    return found


def _holder_skip(
    name: str, node: onnx.NodeProto, position: int, weights: dict[str, onnx.TensorProto], reason: str, kind: str,
    scope: str = "",
) -> Skip:
    largest = max(weights.values(), key=lambda tensor: _elements(tensor.dims))
    params = sum(_elements(tensor.dims) for tensor in weights.values())
    return Skip(
        name, node.op_type, position, reason, tuple(int(d) for d in largest.dims),
        sum(tensor_bytes(tensor) for tensor in weights.values()), kind, scope, params, tuple(weights),
    )


def _weight_holder_skips(index: GraphIndex) -> list[Skip]:
    """Every main-graph node other than a MatMul/Gemm that reads constant weights: a skip with its reason,
    so no weights go unmentioned. Chain nodes over a constant (a Transpose of a weight) are left to their
    readers."""
    skips: list[Skip] = []
    for position, node in enumerate(index.graph.node):
        if node.op_type in SITE_OPS or node.op_type in CONV_OPS or node.op_type == "Constant":
            continue
        if node.op_type in CHAIN_OPS and node.output and index.trace(node.output[0]) is not None:
            continue
        weights = _constant_weights(node, index.trace)
        if weights:
            reason = _holder_reason(node.op_type)
            skips.append(_holder_skip(node_name(node, position), node, position, weights, reason, "weights"))
    return skips


class _BodyScope:
    """Constants and producers of an If/Loop/Scan body, falling back to the scopes around it."""

    def __init__(self, graph: onnx.GraphProto, outer: GraphIndex | _BodyScope) -> None:
        self.graph = graph
        self.outer = outer
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.inputs = {value.name for value in graph.input}
        self.producers = {name: node for node in graph.node for name in node.output if name}

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.inputs:
            return None  # a body input shadows any outer name
        if name in self.initializers:
            return self.initializers[name]
        node = self.producers.get(name)
        if node is not None:
            if node.op_type == "Constant":
                return next((a.t for a in node.attribute if a.name == "value"), None)
            return None
        return self.outer.constant_tensor(name)

    def producer_node(self, name: str) -> tuple[Any, onnx.NodeProto] | None:
        if name in self.inputs or name in self.initializers:
            return None
        node = self.producers.get(name)
        if node is not None:
            return node, node
        found = self.outer.producer_node(name)
        return None if found is None else (found[1], found[1])

    def trace(self, name: str) -> tuple[str, onnx.TensorProto, tuple[Any, ...]] | None:
        found = trace_constant(name, self.constant_tensor, self.producer_node)
        if found is None or _chain_shape(found[1], found[2], self.constant_tensor) is None:
            return None
        return found


def _bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """``(attribute name, body)`` of each subgraph held by ``node``."""
    bodies = []
    for attribute in node.attribute:
        if attribute.HasField("g"):
            bodies.append((attribute.name, attribute.g))
        bodies.extend((attribute.name, graph) for graph in attribute.graphs)
    return bodies


def _subgraph_skips(index: GraphIndex) -> list[Skip]:
    """Nodes inside If/Loop/Scan bodies (at any depth) that read constant weights, defined in the body or
    outside it: skips with their scope. Sites inside subgraphs are not supported yet."""
    skips: list[Skip] = []

    def visit(scope: GraphIndex | _BodyScope, holder: onnx.NodeProto, path: str, position: int) -> None:
        for attribute, body in _bodies(holder):
            inner = _BodyScope(body, scope)
            where = f"{attribute} of {holder.op_type} {path!r}"
            for number, node in enumerate(body.node):
                name = f"{path}/{attribute}/{node_name(node, number)}"
                if node.op_type == "Constant":
                    continue
                if node.op_type in CHAIN_OPS and node.output and inner.trace(node.output[0]) is not None:
                    continue
                if node.op_type in SITE_OPS:  # a weight of any size: outside a body it would be a site
                    weights = {}
                    for operand in node.input[:2]:
                        traced = inner.trace(operand) if operand else None
                        if traced is not None and len(traced[1].dims) == 2:
                            weights.setdefault(traced[0], traced[1])
                    reason = f"inside {where}: sites inside If/Loop/Scan bodies are not supported yet"
                else:
                    weights = _constant_weights(node, inner.trace)
                    reason = f"inside {where}: {_holder_reason(node.op_type)}"
                if weights:
                    skips.append(_holder_skip(name, node, position, weights, reason, "subgraph", where))
                visit(inner, node, name, position)

    for position, node in enumerate(index.graph.node):
        visit(index, node, node_name(node, position), position)
    return skips


def _filter_reason(site: Site, config: RewriteConfig) -> str:
    if config.include is not None and not re.search(config.include, site.name):
        return f"name does not match --include '{config.include}'"
    if config.exclude is not None and re.search(config.exclude, site.name):
        return f"name matches --exclude '{config.exclude}'"
    if site.params < config.min_params:
        return f"{site.params} parameters < --min-params {config.min_params}"
    return ""


def _match_node(index: GraphIndex, node: onnx.NodeProto, position: int) -> Site | Skip:
    name = node_name(node, position)
    op = node.op_type
    if len(node.input) < 2 or not node.input[0] or not node.input[1]:
        return Skip(name, op, position, "malformed node: fewer than two inputs")
    left, right = index.trace(node.input[0]), index.trace(node.input[1])
    if left is not None and right is not None:
        return Skip(name, op, position, "both operands are constant (constant-fold it instead)")
    if left is None and right is None:
        return Skip(name, op, position, "both operands are dynamic (no constant weight)")
    side = "right" if right is not None else "left"
    stored_name, stored, chain = right if right is not None else left  # type: ignore[misc]
    weight_input = node.input[1] if side == "right" else node.input[0]
    activation = node.input[0] if side == "right" else node.input[1]
    shape = _shape_of(index, stored, chain)
    if len(shape) != 2:
        detail = "broadcast batch weights are not supported" if len(shape) > 2 else "not a matrix"
        return Skip(name, op, position, f"weight {weight_input!r} has rank {len(shape)} ({detail})", shape)
    compute_dtype = _dtype_of(index, stored, chain)
    if compute_dtype not in FLOAT_TYPES:
        dtype_name = onnx.helper.tensor_dtype_to_string(compute_dtype)
        return Skip(name, op, position, f"weight dtype {dtype_name} is not floating point", shape)
    if 0 in shape:
        return Skip(name, op, position, "weight is empty", shape)
    alpha, beta, bias = 1.0, 1.0, None
    transpose_activation = False
    if op == "Gemm":
        alpha = float(_attribute(node, "alpha", 1.0))
        beta = float(_attribute(node, "beta", 1.0))
        trans_a, trans_b = bool(_attribute(node, "transA", 0)), bool(_attribute(node, "transB", 0))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if alpha == 0.0:
            return Skip(name, op, position, "Gemm alpha is 0 (the weight does not contribute)", shape)
        if side == "right":
            # op(B) = Bᵀ when transB: stored [N, K]. W_kn = α·op(B).
            transpose_weight, transpose_activation = trans_b, trans_a
            k, n = (shape[1], shape[0]) if trans_b else shape
        else:
            # op(A) = Aᵀ when transA: op(A) is [M, Kg]; W_kn = (α·op(A))ᵀ is [Kg, M].
            transpose_weight, transpose_activation = not trans_a, trans_b
            k, n = (shape[0], shape[1]) if trans_a else (shape[1], shape[0])
    elif side == "right":
        transpose_weight = False
        k, n = shape
    else:
        transpose_weight = True  # W [P, Q] on the left: W_kn = Wᵀ, K = Q, N = P.
        k, n = shape[1], shape[0]
    source = WeightSource(
        stored_name, chain, stored.data_type, compute_dtype, shape, _stored_bytes(index, stored, chain)
    )
    signature, flipped = _value_signature(index, stored, chain)
    group = f"{stored_name}|{signature}|{alpha!r}"
    return Site(
        name=name,
        op_type=op,
        node_index=position,
        activation=activation,
        output=node.output[0],
        weight=source,
        weight_side=side,
        k=int(k),
        n=int(n),
        transpose_weight=transpose_weight,
        transpose_activation=transpose_activation,
        alpha=alpha,
        beta=beta,
        bias=bias,
        group=group,
        kn_transposed=flipped != transpose_weight,
    )


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> tuple[int, ...]:
    for attribute in node.attribute:
        if attribute.name == name:
            return tuple(int(v) for v in onnx.helper.get_attribute_value(attribute))
    return tuple(default)


def _match_conv(index: GraphIndex, node: onnx.NodeProto, position: int, form: str) -> Site | Skip:
    """A Conv with a constant weight ``[N, C, k…]`` as a site in ``form`` (``--conv``; ``auto`` matches the
    channel form, the pipeline chooses), or a skip with its reason."""
    name, op = node_name(node, position), node.op_type
    if len(node.input) < 2 or not node.input[0] or not node.input[1]:
        return Skip(name, op, position, "malformed node: fewer than two inputs")
    traced = index.trace(node.input[1])
    if traced is None:
        return Skip(name, op, position, "the Conv weight is dynamic (no constant weight)")
    stored_name, stored, chain = traced
    shape = _shape_of(index, stored, chain)
    size = _elements(shape)
    skip_bytes = _stored_bytes(index, stored, chain)

    def skip(reason: str) -> Skip:
        return Skip(name, op, position, reason, shape, skip_bytes, "weights", "", size, (stored_name,))

    if index.trace(node.input[0]) is not None:
        return skip("both operands are constant (constant-fold it instead)")
    spatial_dims = len(shape) - 2
    if not 1 <= spatial_dims <= 3:
        return skip(f"a Conv weight of rank {len(shape)}: only 1-D, 2-D and 3-D Convs are sites")
    compute_dtype = _dtype_of(index, stored, chain)
    if compute_dtype not in FLOAT_TYPES:
        return skip(f"weight dtype {onnx.helper.tensor_dtype_to_string(compute_dtype)} is not floating point")
    if 0 in shape:
        return skip("weight is empty")
    groups = int(_attribute(node, "group", 1))
    out_channels, per_group = int(shape[0]), int(shape[1])
    kernel = tuple(int(d) for d in shape[2:])
    if groups > 1:
        if per_group == 1:
            return skip(f"depthwise Conv (group={groups}, one input channel per filter): nothing to factor across "
                        "channels")
        return skip(f"grouped Conv (group={groups}): factoring per group is not supported yet")
    if _ints(node, "kernel_shape", list(kernel)) != kernel:
        return skip(f"kernel_shape {list(_ints(node, 'kernel_shape', []))} differs from the weight's {list(kernel)}")
    auto_pad = _attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = _ints(node, "pads", [0] * (2 * spatial_dims)) if auto_pad == "NOTSET" else (0,) * (2 * spatial_dims)
    geometry = ConvGeometry(
        form="channel",
        in_channels=per_group,
        out_channels=out_channels,
        kernel=kernel,
        strides=_ints(node, "strides", [1] * spatial_dims),
        pads=pads,
        auto_pad=auto_pad,
        dilations=_ints(node, "dilations", [1] * spatial_dims),
        spatial_applies=spatial_dims == 2 and kernel[0] > 1 and kernel[1] > 1,
    )
    if form == "spatial":
        if geometry.spatial_applies:
            geometry = dataclasses.replace(geometry, form="spatial")
        else:
            note = f"--conv spatial needs a 2-D kernel with k_h > 1 and k_w > 1 (this one is {kernel}): channel form"
            geometry = dataclasses.replace(geometry, note=note)
    k, n = geometry.shape_in(geometry.form)
    source = WeightSource(stored_name, chain, stored.data_type, compute_dtype, shape, skip_bytes)
    signature, _ = _value_signature(index, stored, chain)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return Site(
        name=name, op_type=op, node_index=position, activation=node.input[0], output=node.output[0],
        weight=source, weight_side="right", k=k, n=n, transpose_weight=False, transpose_activation=False,
        alpha=1.0, beta=1.0, bias=bias, group=f"{stored_name}|{signature}|conv:{geometry.form}", conv=geometry,
    )


def _drop_shared_with_dense(index: GraphIndex, sites: Iterable[Site]) -> tuple[list[Site], list[Skip]]:
    """Sites whose stored weight (or a chain output) is also read by a node that stays: skipped.

    Factorizing them would add the factors while the dense copy stays for the other consumer.
    """
    sites = list(sites)
    site_nodes = {site.node_index for site in sites}
    chain_nodes = {position for site in sites for position in site.weight.chain}
    rewritten = site_nodes | chain_nodes
    kept: list[Site] = []
    skips: list[Skip] = []
    for site in sites:
        tensors = [site.weight.tensor] + [index.graph.node[p].output[0] for p in site.weight.chain]
        blocker = ""
        for tensor in tensors:
            if tensor in index.graph_outputs:
                blocker = f"weight {tensor!r} is also a graph output"
                break
            for consumer in index.consumers.get(tensor, []):
                if consumer not in rewritten:
                    other = index.graph.node[consumer]
                    blocker = (
                        f"weight {site.weight.tensor!r} is also read by {other.op_type} node "
                        f"{node_name(other, consumer)!r}, which keeps the dense copy"
                    )
                    break
            if blocker:
                break
        if blocker:
            skips.append(Skip(site.name, site.op_type, site.node_index, blocker, site.shape, site.dense_bytes))
        else:
            kept.append(site)
    if len(kept) != len(sites):
        # Dropping a site can strand a weight its group-mates share: repeat until stable.
        again, more = _drop_shared_with_dense(index, kept)
        return again, skips + more
    return kept, skips
