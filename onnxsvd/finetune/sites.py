"""Finding the factorized sites of a rewritten model: pairs of nodes ``<site>/svd_a`` → ``<site>/svd_b``.

Legend: K input channels, N output channels, r the rank of a chain.

``onnxsvd rewrite`` replaces ``Y = X · W`` by ``H = X · A``, ``Y = H · B`` (``A`` ``[K, r]``, ``B``
``[r, N]``), as MatMul or Gemm nodes, or by the mirror ``H = Aᵀ · X``, ``Y = Bᵀ · H`` for a weight on the
left. With ``--layout stages`` each stage is its own pair (``<site>/svd_s1_a`` → ``<site>/svd_s1_b``…).
A pair is found by its node names and checked by its structure: the first node's output feeds the
second, and each reads one constant factor, an initializer possibly behind ``Cast``/``Identity`` (factors
stored in fp16). Gemm attributes decide the orientation: ``transB`` on a right-hand factor, ``transA`` on a
left-hand one means the stored tensor is already the other way round. ``alpha``, ``transA`` on the
activation and ``C``/``beta`` on the second node are left as they are: training changes the stored
factors only.

Sites that share factors (a weight read by several nodes) are one :class:`FactorPair` with several
node pairs, so they stay shared. A pair whose factors are also read elsewhere in another role is
skipped with its reason.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["FactorPair", "PairSkip", "find_factor_pairs", "read_factors"]

_FIRST_NODE = re.compile(r"^(?P<site>.+)/(?P<tag>svd(?:_s\d+)?)_a$")
_PASS_THROUGH = ("Cast", "Identity")
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


@dataclasses.dataclass(frozen=True)
class FactorPair:
    """One pair of factor initializers, ``W_kn ≈ A · B``, and the chains that read them.

    Attributes:
        sites: names of the sites (``<site>`` of the node names; a stage adds ``/svd_sI``).
        outputs: the tensor each chain's second node writes (the site's output for the fused layout).
        a_tensor: the initializer holding the first factor (``A`` or ``Aᵀ`` as stored).
        b_tensor: the initializer holding the second factor (``B`` or ``Bᵀ``).
        a_transposed: the stored first factor is ``Aᵀ`` ``[r, K]``.
        b_transposed: the stored second factor is ``Bᵀ`` ``[N, r]``.
        k: input channels.
        n: output channels.
        rank: r.
        dtype: the ONNX dtype the factors are stored in.
    """

    sites: tuple[str, ...]
    outputs: tuple[str, ...]
    a_tensor: str
    b_tensor: str
    a_transposed: bool
    b_transposed: bool
    k: int
    n: int
    rank: int
    dtype: int

    def normal_form(self, stored_a: np.ndarray, stored_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(A [K, r], B [r, N])`` from the stored tensors."""
        a = stored_a.T if self.a_transposed else stored_a  # [K, r]
        b = stored_b.T if self.b_transposed else stored_b  # [r, N]
        return a, b

    def stored(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tensors to store for ``A [K, r]`` and ``B [r, N]``, in the pair's orientation and dtype."""
        dtype = helper.tensor_dtype_to_np_dtype(self.dtype)
        first = a.T if self.a_transposed else a
        second = b.T if self.b_transposed else b
        return np.ascontiguousarray(first.astype(dtype)), np.ascontiguousarray(second.astype(dtype))


@dataclasses.dataclass(frozen=True)
class PairSkip:
    """A ``…/svd_a`` node that is not trained, with the reason."""

    site: str
    reason: str


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(helper.get_attribute_value(attribute))
    return default


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.by_name: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            self.by_name.setdefault(node.name, node)
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)

    def stored_factor(self, name: str) -> str | None:
        """The initializer behind ``name`` (directly, or through Cast/Identity), if it is a float constant."""
        current = name
        for _ in range(8):
            if current in self.initializers and current not in self.graph_inputs:
                tensor = self.initializers[current]
                return current if tensor.data_type in _FLOATS and len(tensor.dims) == 2 else None
            node = self.producer.get(current)
            if node is None or node.op_type not in _PASS_THROUGH:
                return None
            current = node.input[0]
        return None


def _orientation(node: onnx.NodeProto, constant_position: int) -> bool:
    """Whether the stored factor read at ``constant_position`` is the transpose of the normal form.

    Normal form: ``A`` ``[K, r]`` for the first node, ``B`` ``[r, N]`` for the second. A right-hand factor
    (position 1) is consumed as ``op(T)`` = the normal form; a left-hand one (position 0) as ``op(T)`` =
    its transpose. Gemm's ``transB``/``transA`` on the factor flips the stored orientation.
    """
    if constant_position == 1:
        return bool(node.op_type == "Gemm" and _attribute(node, "transB", 0))
    transposed_by_op = node.op_type == "Gemm" and bool(_attribute(node, "transA", 0))
    return not transposed_by_op


def find_factor_pairs(model: onnx.ModelProto) -> tuple[list[FactorPair], list[PairSkip]]:
    """The trainable factor pairs of a rewritten model, in graph order, and the chains left alone.

    Returns:
        (pairs, skips).
    """
    graph = _Graph(model.graph)
    found: dict[tuple[str, str], dict] = {}
    order: list[tuple[str, str]] = []
    skips: list[PairSkip] = []
    for node in model.graph.node:
        match = _FIRST_NODE.match(node.name)
        if node.op_type not in ("MatMul", "Gemm") or match is None:
            continue
        site, tag = match.group("site"), match.group("tag")
        label = site if tag == "svd" else f"{site}/{tag}"
        second = graph.by_name.get(f"{site}/{tag}_b")
        if second is None or second.op_type not in ("MatMul", "Gemm") or node.output[0] not in second.input[:2]:
            skips.append(PairSkip(label, "no second node reading the first node's output"))
            continue
        first_constant = [i for i in (0, 1) if graph.stored_factor(node.input[i]) is not None]
        second_constant = [i for i in (0, 1) if graph.stored_factor(second.input[i]) is not None]
        if len(first_constant) != 1 or len(second_constant) != 1:
            skips.append(PairSkip(label, "each node of the chain must read exactly one constant factor"))
            continue
        a_position, b_position = first_constant[0], second_constant[0]
        if second.input[1 - b_position] != node.output[0]:
            skips.append(PairSkip(label, "the second node does not read the chain's hidden tensor"))
            continue
        a_name = graph.stored_factor(node.input[a_position])
        b_name = graph.stored_factor(second.input[b_position])
        assert a_name is not None and b_name is not None
        a_transposed = _orientation(node, a_position)
        b_transposed = _orientation(second, b_position)
        a_tensor, b_tensor = graph.initializers[a_name], graph.initializers[b_name]
        a_shape = tuple(reversed(a_tensor.dims)) if a_transposed else tuple(a_tensor.dims)  # (K, r)
        b_shape = tuple(reversed(b_tensor.dims)) if b_transposed else tuple(b_tensor.dims)  # (r, N)
        if a_shape[1] != b_shape[0]:
            skips.append(PairSkip(label, f"factor shapes {list(a_shape)} and {list(b_shape)} do not chain"))
            continue
        if a_tensor.data_type != b_tensor.data_type:
            skips.append(PairSkip(label, "the two factors are stored in different dtypes"))
            continue
        key = (a_name, b_name)
        entry = found.get(key)
        if entry is None:
            entry = {
                "sites": [], "outputs": [], "a_transposed": a_transposed, "b_transposed": b_transposed,
                "k": int(a_shape[0]), "n": int(b_shape[1]), "rank": int(a_shape[1]), "dtype": a_tensor.data_type,
            }
            found[key] = entry
            order.append(key)
        elif (entry["a_transposed"], entry["b_transposed"]) != (a_transposed, b_transposed):
            skips.append(PairSkip(label, "shares its factors with a chain that reads them the other way round"))
            continue
        entry["sites"].append(label)
        entry["outputs"].append(second.output[0])
    # A factor tensor in two different pairs cannot be trained as either without changing the other.
    counts: dict[str, int] = defaultdict(int)
    for a_name, b_name in order:
        counts[a_name] += 1
        counts[b_name] += 1
    pairs: list[FactorPair] = []
    for key in order:
        entry = found[key]
        if counts[key[0]] > 1 or counts[key[1]] > 1:
            skips.extend(PairSkip(site, "a factor tensor shared with another pair") for site in entry["sites"])
            continue
        pairs.append(
            FactorPair(
                sites=tuple(entry["sites"]),
                outputs=tuple(entry["outputs"]),
                a_tensor=key[0],
                b_tensor=key[1],
                a_transposed=entry["a_transposed"],
                b_transposed=entry["b_transposed"],
                k=entry["k"],
                n=entry["n"],
                rank=entry["rank"],
                dtype=entry["dtype"],
            )
        )
    return pairs, skips


def read_factors(model: onnx.ModelProto, pair: FactorPair) -> tuple[np.ndarray, np.ndarray]:
    """``(A [K, r], B [r, N])`` of ``pair`` as float64, from the model's initializers."""
    tensors = {t.name: t for t in model.graph.initializer if t.name in (pair.a_tensor, pair.b_tensor)}
    stored_a = numpy_helper.to_array(tensors[pair.a_tensor]).astype(np.float64)
    stored_b = numpy_helper.to_array(tensors[pair.b_tensor]).astype(np.float64)
    return pair.normal_form(stored_a, stored_b)
