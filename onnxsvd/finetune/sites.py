"""The factor chains of a rewritten model, read from what ``onnxsvd rewrite`` recorded on their nodes.

Legend: K input channels, N output channels, r the rank of a chain.

``onnxsvd rewrite`` replaces ``Y = X · W`` by ``H = X · A``, ``Y = H · B`` (``A`` ``[K, r]``, ``B``
``[r, N]``), as MatMul or Gemm nodes, or by the mirror ``H = Aᵀ · X``, ``Y = Bᵀ · H`` for a weight on the
left, or for a Conv site by two Convs whose weights are the factors reshaped
(:mod:`onnxsvd.graph.conv`: ``[r, C, k…]`` and ``[N, r, 1…]``, or the spatial form's ``[r, C, k_h, 1]`` and
``[N, r, 1, k_w]``); with ``--layout stages`` each stage is its own chain. Every node it writes carries a
:class:`onnxsvd.graph.records.ChainRecord`: the site, the stage, the node's role (``first``/``second``…),
the weight's side and the names of the two factor initializers. Nothing is found by node names or by
pattern: a model without records (rewritten by an older onnxsvd, or edited by hand) is refused by
:func:`require_records` with the fix.

Each recorded chain is checked against the graph before it is trained: its first node's output feeds
its second node, each reads its recorded factor (an initializer, possibly behind ``Cast``/``Identity``)
where the weight's side puts it, without a Gemm ``trans`` attribute on it, and the factors' shapes chain.
``alpha``, ``transA`` on the activation and ``C``/``beta`` on the second node are left as they are:
training changes the stored factors only. A chain that fails a check is skipped with its reason.

Sites that share factors (a weight read by several nodes) are one :class:`FactorPair` with several
chains, so they stay shared. A pair whose factors are also read elsewhere in another role is skipped with
its reason.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsvd.errors import ModelError, UsageError
from onnxsvd.graph.conv import conv_factors_from_weights
from onnxsvd.graph.records import ChainRecord, RecordError, has_record, read_record

__all__ = ["FactorPair", "PairSkip", "find_factor_pairs", "read_factors", "require_records"]

_PASS_THROUGH = ("Cast", "Identity")
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


@dataclasses.dataclass(frozen=True)
class FactorPair:
    """One pair of factor initializers, ``W_kn ≈ A · B``, and the chains that read them.

    Attributes:
        sites: the chains' labels (:attr:`onnxsvd.graph.records.ChainRecord.label`: the site's name, with
            ``/svd_sI`` for stage I of the stages layout).
        outputs: the tensor each chain's second node writes (the site's output for the fused layout).
        a_tensor: the initializer holding the first factor (``A`` or ``Aᵀ`` as stored).
        b_tensor: the initializer holding the second factor (``B`` or ``Bᵀ``).
        a_transposed: the stored first factor is ``Aᵀ`` ``[r, K]``.
        b_transposed: the stored second factor is ``Bᵀ`` ``[N, r]``.
        k: input channels.
        n: output channels.
        rank: r.
        dtype: the ONNX dtype the factors are stored in.
        conv_form: for a Conv chain, ``"channel"`` or ``"spatial"`` (the factors are stored as Conv weights
            of ``a_shape`` and ``b_shape``); ``None`` for MatMul/Gemm chains.
        a_shape: the stored first factor's shape (a Conv chain's).
        b_shape: the stored second factor's shape (a Conv chain's).
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
    conv_form: str | None = None
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()

    def layout(self, a, b):  # noqa: ANN001, ANN201 - numpy arrays or torch tensors alike
        """The tensors as the graph stores them (before the dtype) for ``A [K, r]``, ``B [r, N]``: numpy
        arrays or torch tensors."""
        if self.conv_form is None:
            return (a.T if self.a_transposed else a), (b.T if self.b_transposed else b)
        first = a.T.reshape(self.a_shape)  # [r, C, k…]
        if self.conv_form == "spatial":
            n, rank, _, k_w = self.b_shape
            shaped = b.reshape(rank, k_w, n)  # [r, k_w, N]
            moved = shaped.permute(2, 0, 1) if hasattr(shaped, "permute") else shaped.transpose(2, 0, 1)
            return first, moved.reshape(self.b_shape)  # [N, r, 1, k_w]
        return first, b.T.reshape(self.b_shape)  # [N, r, 1…]

    def normal_form(self, stored_a: np.ndarray, stored_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(A [K, r], B [r, N])`` from the stored tensors."""
        if self.conv_form is not None:
            a, b, _ = conv_factors_from_weights(stored_a, stored_b)
            return a, b
        a = stored_a.T if self.a_transposed else stored_a  # [K, r]
        b = stored_b.T if self.b_transposed else stored_b  # [r, N]
        return a, b

    def stored(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tensors to store for ``A [K, r]`` and ``B [r, N]``, in the pair's orientation and dtype."""
        dtype = helper.tensor_dtype_to_np_dtype(self.dtype)
        first, second = self.layout(a, b)
        return np.ascontiguousarray(first.astype(dtype)), np.ascontiguousarray(second.astype(dtype))


@dataclasses.dataclass(frozen=True)
class PairSkip:
    """A recorded chain that is not trained, with the reason."""

    site: str
    reason: str


def require_records(model: onnx.ModelProto) -> None:
    """Refuse, in one line, a model whose nodes carry no chain records.

    Raises:
        ModelError: the model was made by onnxsvd (its metadata says so) but its nodes carry no records:
            an older onnxsvd, or a tool that rebuilt the nodes without their metadata.
        UsageError: the model is not an onnxsvd rewrite at all.
    """
    if any(has_record(node) for node in model.graph.node):
        return
    stamped = {prop.key: prop.value for prop in model.metadata_props}
    if "onnxsvd.version" in stamped:
        raise ModelError(
            f"the model was rewritten by onnxsvd {stamped['onnxsvd.version']} but its nodes carry no factor "
            "records ('onnxsvd.site', 'onnxsvd.factor_a'… in node metadata_props): an older onnxsvd, or a tool "
            "that rebuilt the nodes, wrote it; re-run 'onnxsvd rewrite' on the original model with this version"
        )
    raise UsageError(
        "the model has no factor chains recorded by 'onnxsvd rewrite' (node metadata 'onnxsvd.site', "
        "'onnxsvd.factor_a'…); rewrite the original model with 'onnxsvd rewrite' first and fine-tune its output"
    )


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
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node

    def reads(self, name: str, initializer: str) -> bool:
        """Whether the tensor ``name`` is ``initializer``, directly or through Cast/Identity nodes."""
        current = name
        for _ in range(8):
            if current == initializer:
                return current in self.initializers and current not in self.graph_inputs
            node = self.producer.get(current)
            if node is None or node.op_type not in _PASS_THROUGH:
                return False
            current = node.input[0]
        return False

    def reads_transposed(self, name: str, initializer: str) -> bool:
        """Whether ``name`` is a ``Transpose`` of ``initializer`` (through Cast/Identity nodes on either side),
        as rewrite emits for a site that reads shared factors the other way round."""
        current = name
        for _ in range(8):
            node = self.producer.get(current)
            if node is None:
                return False
            if node.op_type == "Transpose":
                return self.reads(node.input[0], initializer)
            if node.op_type not in _PASS_THROUGH:
                return False
            current = node.input[0]
        return False


def _check_conv_chain(graph: _Graph, first: onnx.NodeProto, second: onnx.NodeProto, record: ChainRecord) -> str | None:
    """Why a recorded Conv chain cannot be trained, or None: ``first`` reads the activation and ``A``'s
    Conv weight, ``second`` reads ``first``'s output and ``B``'s, both plain (group 1) Convs."""
    if second.op_type != "Conv" or len(first.input) < 2 or len(second.input) < 2:
        return f"node {second.name!r} is a {second.op_type}, not the second Conv of the chain"
    if second.input[0] != first.output[0]:
        return f"node {second.name!r} does not read the chain's hidden tensor {first.output[0]!r}"
    for node, factor in ((first, record.factor_a), (second, record.factor_b)):
        if not graph.reads(node.input[1], factor):
            return f"node {node.name!r} does not read its recorded factor {factor!r} (an initializer)"
        if _attribute(node, "group", 1) != 1:
            return f"node {node.name!r} is a grouped Conv"
    a_tensor, b_tensor = graph.initializers[record.factor_a], graph.initializers[record.factor_b]
    if any(t.data_type not in _FLOATS for t in (a_tensor, b_tensor)) or a_tensor.data_type != b_tensor.data_type:
        return "the two factors are not float tensors of one dtype"
    if len(a_tensor.dims) != len(b_tensor.dims) or not 3 <= len(a_tensor.dims) <= 5:
        return f"factor shapes {list(a_tensor.dims)} and {list(b_tensor.dims)} are not a Conv chain's"
    if a_tensor.dims[0] != record.rank or b_tensor.dims[1] != record.rank:
        return f"factor shapes {list(a_tensor.dims)} and {list(b_tensor.dims)} do not chain at rank {record.rank}"
    return None


def _conv_form(a_tensor: onnx.TensorProto, b_tensor: onnx.TensorProto) -> str:
    """A Conv chain's form, read from its second weight: a ``1×k_w`` kernel with ``k_w > 1`` is spatial."""
    return "spatial" if len(b_tensor.dims) == 4 and b_tensor.dims[3] > 1 else "channel"


def _check_chain(graph: _Graph, first: onnx.NodeProto, second: onnx.NodeProto, record: ChainRecord) -> str | None:
    """Why the recorded chain cannot be trained as recorded, or None when the graph agrees with its record.

    Right side: ``first`` reads ``A`` at input 1, ``second`` reads ``B`` at input 1 and ``first``'s output
    at input 0. Left side: the factors at input 0, the hidden tensor at input 1. A Gemm ``transB`` (right)
    or ``transA`` (left) would apply to the factor: rewrite never sets one there.
    """
    if first.op_type == "Conv":
        return _check_conv_chain(graph, first, second, record)
    for node in (first, second):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            return f"node {node.name!r} is a {node.op_type} with {len(node.input)} inputs, not a MatMul or Gemm"
    factor_position = 1 if record.weight_side == "right" else 0
    hidden_position = 1 - factor_position
    trans = "transB" if record.weight_side == "right" else "transA"
    if second.input[hidden_position] != first.output[0]:
        return f"node {second.name!r} does not read the chain's hidden tensor {first.output[0]!r}"
    for node, factor in ((first, record.factor_a), (second, record.factor_b)):
        if not graph.reads(node.input[factor_position], factor):
            if graph.reads_transposed(node.input[factor_position], factor):
                return (
                    f"reads the shared factor {factor!r} transposed (a use of a shared weight the other way "
                    "round): it is trained with the chains that read it directly"
                )
            return f"node {node.name!r} does not read its recorded factor {factor!r} (an initializer)"
        if node.op_type == "Gemm" and _attribute(node, trans, 0):
            return f"node {node.name!r} has {trans}=1 on its factor"
    a_tensor, b_tensor = graph.initializers[record.factor_a], graph.initializers[record.factor_b]
    for tensor in (a_tensor, b_tensor):
        if tensor.data_type not in _FLOATS or len(tensor.dims) != 2:
            return f"factor {tensor.name!r} is not a 2-D float tensor"
    if a_tensor.data_type != b_tensor.data_type:
        return "the two factors are stored in different dtypes"
    transposed = record.weight_side == "left"
    a_shape = tuple(reversed(a_tensor.dims)) if transposed else tuple(a_tensor.dims)  # (K, r)
    b_shape = tuple(reversed(b_tensor.dims)) if transposed else tuple(b_tensor.dims)  # (r, N)
    if a_shape[1] != b_shape[0] or a_shape[1] != record.rank:
        return f"factor shapes {list(a_shape)} and {list(b_shape)} do not chain at the recorded rank {record.rank}"
    return None


def find_factor_pairs(model: onnx.ModelProto) -> tuple[list[FactorPair], list[PairSkip]]:
    """The trainable factor pairs of a rewritten model, in graph order, and the recorded chains left alone.

    Only chains recorded by ``onnxsvd rewrite`` are found (see :func:`require_records`).

    Returns:
        (pairs, skips).
    """
    graph = _Graph(model.graph)
    chains: dict[tuple[str, int], dict[str, tuple[onnx.NodeProto, ChainRecord]]] = {}
    skips: list[PairSkip] = []
    for node in model.graph.node:
        try:
            record = read_record(node)
        except RecordError as error:
            skips.append(PairSkip(node.name, f"node {node.name!r}: {error}"))
            continue
        if record is None or record.role not in ("first", "second"):
            continue
        roles = chains.setdefault((record.site, record.stage), {})
        if record.role in roles:
            skips.append(PairSkip(record.label, f"two nodes record the role '{record.role}'"))
            continue
        roles[record.role] = (node, record)
    found: dict[tuple[str, str], dict] = {}
    order: list[tuple[str, str]] = []
    for roles in chains.values():
        present = next(iter(roles.values()))[1]
        if set(roles) != {"first", "second"}:
            missing = "first" if "first" not in roles else "second"
            skips.append(PairSkip(present.label, f"the chain has no node recording the role '{missing}'"))
            continue
        (first, record), (second, other) = roles["first"], roles["second"]
        if dataclasses.replace(other, role=record.role) != record:
            skips.append(PairSkip(record.label, "its two nodes record different factors"))
            continue
        reason = _check_chain(graph, first, second, record)
        if reason is not None:
            skips.append(PairSkip(record.label, reason))
            continue
        a_tensor = graph.initializers[record.factor_a]
        b_tensor = graph.initializers[record.factor_b]
        transposed = record.weight_side == "left"
        key = (record.factor_a, record.factor_b)
        entry = found.get(key)
        if entry is None:
            entry = {
                "sites": [], "outputs": [], "transposed": transposed,
                "k": int(a_tensor.dims[1] if transposed else a_tensor.dims[0]),
                "n": int(b_tensor.dims[0] if transposed else b_tensor.dims[1]),
                "rank": record.rank, "dtype": a_tensor.data_type, "conv": {},
            }
            if first.op_type == "Conv":
                form = _conv_form(a_tensor, b_tensor)
                spatial_width = int(b_tensor.dims[3]) if form == "spatial" else 1
                entry["k"] = int(np.prod(a_tensor.dims[1:]))
                entry["n"] = int(b_tensor.dims[0]) * spatial_width
                entry["conv"] = {"conv_form": form, "a_shape": tuple(int(d) for d in a_tensor.dims),
                                 "b_shape": tuple(int(d) for d in b_tensor.dims)}
            found[key] = entry
            order.append(key)
        elif entry["transposed"] != transposed:
            skips.append(PairSkip(record.label, "shares its factors with a chain that reads them the other way round"))
            continue
        entry["sites"].append(record.label)
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
                a_transposed=entry["transposed"],
                b_transposed=entry["transposed"],
                k=entry["k"],
                n=entry["n"],
                rank=entry["rank"],
                dtype=entry["dtype"],
                **entry["conv"],
            )
        )
    return pairs, skips


def read_factors(model: onnx.ModelProto, pair: FactorPair) -> tuple[np.ndarray, np.ndarray]:
    """``(A [K, r], B [r, N])`` of ``pair`` as float64, from the model's initializers."""
    tensors = {t.name: t for t in model.graph.initializer if t.name in (pair.a_tensor, pair.b_tensor)}
    stored_a = numpy_helper.to_array(tensors[pair.a_tensor]).astype(np.float64)
    stored_b = numpy_helper.to_array(tensors[pair.b_tensor]).astype(np.float64)
    return pair.normal_form(stored_a, stored_b)
