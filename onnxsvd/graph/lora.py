"""LoRA branches for ONNX Runtime adapters: comparing two graphs, declaring factor inputs, emitting ``X·A·B``.

Dimension legend:
    K  input channels of a site (normal form ``Y = X · W_kn``)
    N  output channels of a site
    r  rank of the branch (per adapter; a symbolic dimension of the graph inputs)

For a site in normal form and a low-rank delta ``ΔW_kn ≈ A·B`` (``A`` ``[K, r]``, ``B`` ``[r, N]``) the
branch added to the site's output is

- right-hand weight: ``Y = Y_base + (X · A) · B`` (Gemm ``transA`` stays on the first node);
- left-hand weight (``W = W_knᵀ``): ``Y = Y_base + Bᵀ · (Aᵀ · X)`` (Gemm ``transB`` on the first node),

so the factors are always stored in the normal form, whatever side the weight is on. In the adapter model
(``base_lora.onnx``) ``A`` and ``B`` are graph inputs with defaults: initializers of the same name holding
``[K, 0]`` and ``[0, N]``, a rank-0 branch that adds exactly zero. ONNX Runtime's adapters
(``onnxruntime.LoraAdapter``, ``RunOptions.add_active_adapter``) feed those inputs per run. In a merged
model the same branch reads constant factors. Sites that share a weight share one pair of inputs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsvd.errors import ModelError
from onnxsvd.graph.emit import _clean, _Names
from onnxsvd.graph.match import Site

__all__ = [
    "LORA_METADATA_KEY",
    "LoraSlot",
    "LoraModelInfo",
    "first_difference",
    "check_same_graph",
    "plan_slots",
    "emit_lora",
    "lora_info",
    "adapter_values",
]

#: ``metadata_props`` key of an adapter model: its model version and its slots, as JSON.
LORA_METADATA_KEY = "onnxsvd.lora"


@dataclasses.dataclass(frozen=True)
class LoraSlot:
    """One pair of adapter inputs: the delta of one weight group, read by each of its sites.

    Attributes:
        key: the weight group (:attr:`Site.group`).
        sites: names of the nodes the branch is added to.
        a_name: graph input holding ``A`` ``[K, r]``.
        b_name: graph input holding ``B`` ``[r, N]``.
        k: input channels.
        n: output channels.
        dtype: ONNX element type of ``A`` and ``B`` (the factor dtype; cast to the site's dtype in the graph).
    """

    key: str
    sites: tuple[str, ...]
    a_name: str
    b_name: str
    k: int
    n: int
    dtype: int

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        """The rank-0 factors ``[K, 0]`` and ``[0, N]``: a branch that adds nothing."""
        np_dtype = helper.tensor_dtype_to_np_dtype(self.dtype)
        return np.zeros((self.k, 0), np_dtype), np.zeros((0, self.n), np_dtype)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self) | {"sites": list(self.sites)}


@dataclasses.dataclass(frozen=True)
class LoraModelInfo:
    """What an adapter model declares: the version its adapters must carry, and its slots."""

    model_version: int
    slots: tuple[LoraSlot, ...]


def _attribute_signature(attribute: onnx.AttributeProto) -> bytes:
    """An attribute as compared between models: a tensor attribute (a ``Constant``'s value) by dtype and
    shape only, since weights may differ; everything else byte for byte."""
    if attribute.type == onnx.AttributeProto.TENSOR:
        return f"{attribute.name}:tensor:{attribute.t.data_type}:{list(attribute.t.dims)}".encode()
    return attribute.SerializeToString(deterministic=True)


def _value_signature(value: onnx.ValueInfoProto) -> str:
    return f"{value.name}:{value.type.SerializeToString(deterministic=True).hex()}"


def _type_text(value: onnx.ValueInfoProto) -> str:
    """``float32[batch,64]``: a value's type in a few characters."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return value.type.WhichOneof("value") or "untyped"
    dims = ",".join(d.dim_param or str(d.dim_value) if (d.dim_param or d.HasField("dim_value")) else "?"
                    for d in tensor.shape.dim)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "untyped"
    return f"{dtype}[{dims}]"


def first_difference(base: onnx.ModelProto, tuned: onnx.ModelProto) -> str | None:
    """The first way ``tuned``'s graph differs from ``base``'s beyond weight values, or ``None``.

    Compared: opsets, graph inputs and outputs (names and types), initializers (names, dtypes, shapes),
    and every node in order (op type, domain, inputs, outputs, attributes; a ``Constant``'s value by
    dtype and shape).
    """
    opsets = {(o.domain, o.version) for o in base.opset_import}
    if opsets != {(o.domain, o.version) for o in tuned.opset_import}:
        return "the opset imports differ"
    for kind in ("input", "output"):
        ours = [_value_signature(v) for v in getattr(base.graph, kind)]
        theirs = [_value_signature(v) for v in getattr(tuned.graph, kind)]
        if ours != theirs:
            values = list(getattr(base.graph, kind)), list(getattr(tuned.graph, kind))
            if len(values[0]) != len(values[1]):
                return f"the graph has {len(values[0])} {kind}s in one model and {len(values[1])} in the other"
            pairs = zip(*values, strict=True)
            first, second = next((a, b) for a, b in pairs if _value_signature(a) != _value_signature(b))
            return (f"graph {kind} {first.name!r} is {_type_text(first)} in one model, {second.name!r} "
                    f"{_type_text(second)} in the other")
    base_tensors = {t.name: (t.data_type, tuple(t.dims)) for t in base.graph.initializer}
    tuned_tensors = {t.name: (t.data_type, tuple(t.dims)) for t in tuned.graph.initializer}
    for name in sorted(set(base_tensors) ^ set(tuned_tensors)):
        return f"initializer {name!r} is in only one model"
    for name, (dtype, dims) in base_tensors.items():
        if tuned_tensors[name] != (dtype, dims):
            return f"initializer {name!r} is {tuned_tensors[name]} (dtype, shape) in one, {(dtype, dims)} in the other"
    if len(base.graph.node) != len(tuned.graph.node):
        return f"the graphs have {len(base.graph.node)} and {len(tuned.graph.node)} nodes"
    for position, (ours, theirs) in enumerate(zip(base.graph.node, tuned.graph.node, strict=True)):
        label = f"node {position} ({ours.name or ours.op_type})"
        if (ours.op_type, ours.domain) != (theirs.op_type, theirs.domain):
            return f"{label} is {ours.op_type!r} in one, {theirs.op_type!r} in the other"
        if list(ours.input) != list(theirs.input):
            return f"{label} reads {list(ours.input)} in one, {list(theirs.input)} in the other"
        if list(ours.output) != list(theirs.output):
            return f"{label} writes {list(ours.output)} in one, {list(theirs.output)} in the other"
        ours_attributes = sorted(_attribute_signature(a) for a in ours.attribute)
        theirs_attributes = sorted(_attribute_signature(a) for a in theirs.attribute)
        if ours_attributes != theirs_attributes:
            return f"{label} has other attributes ({sorted(a.name for a in theirs.attribute)})"
    return None


def check_same_graph(base: onnx.ModelProto, tuned: onnx.ModelProto, tuned_label: str) -> None:
    """Raise when ``tuned`` is not ``base`` with other weight values.

    Raises:
        ModelError: naming the first difference.
    """
    difference = first_difference(base, tuned)
    if difference is not None:
        raise ModelError(
            f"{tuned_label} is not the base model with other weights: {difference}; extract from a fine-tune of "
            "this base (same export)"
        )


def plan_slots(
    model: onnx.ModelProto, groups: Mapping[str, Sequence[Site]], dtypes: Mapping[str, int]
) -> list[LoraSlot]:
    """One slot per weight group, named after its first site (``<site>.lora_A``/``.lora_B``), names
    fresh in ``model``; ``dtypes`` is the factor dtype of each group."""
    names = _Names(model.graph)
    slots = []
    for key, sites in groups.items():
        stem = _clean(sites[0].name)
        slots.append(
            LoraSlot(
                key=key,
                sites=tuple(site.name for site in sites),
                a_name=names.fresh(f"{stem}.lora_A"),
                b_name=names.fresh(f"{stem}.lora_B"),
                k=sites[0].k,
                n=sites[0].n,
                dtype=dtypes[key],
            )
        )
    return slots


def _branch_nodes(
    site: Site, a_name: str, b_name: str, delta: str, names: _Names
) -> list[onnx.NodeProto]:
    """Nodes computing the branch ``op(X)·A·B`` (or its mirror ``Bᵀ·Aᵀ·op(X)``) into ``delta``."""
    stem = _clean(site.name)
    hidden = names.fresh(f"{stem}/lora_hidden")
    nodes: list[onnx.NodeProto] = []
    if site.weight_side == "right":
        if site.op_type == "Gemm":  # op(X) [M, K] · A [K, r]: transA stays on the activation
            nodes.append(helper.make_node("Gemm", [site.activation, a_name], [hidden],
                                          name=names.fresh(f"{stem}/lora_down"),
                                          transA=int(site.transpose_activation)))
        else:  # X [..., K] · A [K, r] → [..., r]
            nodes.append(helper.make_node("MatMul", [site.activation, a_name], [hidden],
                                          name=names.fresh(f"{stem}/lora_down")))
        nodes.append(helper.make_node("MatMul", [hidden, b_name], [delta], name=names.fresh(f"{stem}/lora_up")))
        return nodes
    # Mirror: Y = W_knᵀ · op(X), so ΔY = Bᵀ · (Aᵀ · op(X)).
    a_t, b_t = names.fresh(f"{stem}/lora_A_t"), names.fresh(f"{stem}/lora_B_t")
    nodes.append(helper.make_node("Transpose", [a_name], [a_t], name=names.fresh(f"{stem}/lora_A_transpose")))
    nodes.append(helper.make_node("Transpose", [b_name], [b_t], name=names.fresh(f"{stem}/lora_B_transpose")))
    if site.op_type == "Gemm":  # Aᵀ [r, K] · op(X) [K, S]
        nodes.append(helper.make_node("Gemm", [a_t, site.activation], [hidden], name=names.fresh(f"{stem}/lora_down"),
                                      transB=int(site.transpose_activation)))
    else:  # Aᵀ [r, K] · X [..., K, S] → [..., r, S]
        nodes.append(
            helper.make_node("MatMul", [a_t, site.activation], [hidden], name=names.fresh(f"{stem}/lora_down"))
        )
    nodes.append(helper.make_node("MatMul", [b_t, hidden], [delta], name=names.fresh(f"{stem}/lora_up")))
    return nodes


def emit_lora(
    model: onnx.ModelProto,
    groups: Mapping[str, Sequence[Site]],
    slots: Sequence[LoraSlot],
    constants: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    model_version: int = 0,
) -> onnx.ModelProto:
    """A copy of ``model`` with a branch ``X·A·B`` added to the output of every site of each slot.

    Args:
        model: the base model (not modified).
        groups: the sites of each weight group, as matched in ``model``.
        slots: the slots to emit (from :func:`plan_slots`).
        constants: ``None``: the factors are graph inputs with rank-0 defaults (the adapter model, stamped
            with ``model_version`` and its slots); else group key → ``(A [K, r], B [r, N])`` constants for
            the slots to merge (a slot missing here gets no branch).
        model_version: the version adapters of this model carry (:func:`lora_info`).
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    names = _Names(graph)
    names.used.update(name for slot in slots for name in (slot.a_name, slot.b_name))
    inserts: dict[int, list[onnx.NodeProto]] = {}
    emitted: list[LoraSlot] = []
    for slot in slots:
        if constants is not None and slot.key not in constants:
            continue
        emitted.append(slot)
        if constants is None:
            a_default, b_default = slot.empty()
            rank = f"{_clean(slot.a_name)}_rank"
            graph.input.append(helper.make_tensor_value_info(slot.a_name, slot.dtype, [slot.k, rank]))
            graph.input.append(helper.make_tensor_value_info(slot.b_name, slot.dtype, [rank, slot.n]))
        else:
            a_default, b_default = constants[slot.key]
            np_dtype = helper.tensor_dtype_to_np_dtype(slot.dtype)
            a_default, b_default = a_default.astype(np_dtype), b_default.astype(np_dtype)
        graph.initializer.append(numpy_helper.from_array(a_default, slot.a_name))
        graph.initializer.append(numpy_helper.from_array(b_default, slot.b_name))
        first = groups[slot.key][0]
        for site in groups[slot.key]:
            node = graph.node[site.node_index]
            stem = _clean(site.name)
            a_name, b_name = slot.a_name, slot.b_name
            nodes: list[onnx.NodeProto] = []
            if site.kn_transposed != first.kn_transposed:  # this use reads Vᵀ: ΔW_kn = (A·B)ᵀ = Bᵀ·Aᵀ
                a_name, b_name = names.fresh(f"{stem}/lora_Bt"), names.fresh(f"{stem}/lora_At")
                for source, target in ((slot.b_name, a_name), (slot.a_name, b_name)):
                    nodes.append(helper.make_node("Transpose", [source], [target], name=names.fresh(f"{target}_node")))
            if slot.dtype != site.weight.compute_dtype:  # fp16 factors of an fp32 site: cast in the graph
                cast_a, cast_b = names.fresh(f"{stem}/lora_A_cast"), names.fresh(f"{stem}/lora_B_cast")
                nodes.append(helper.make_node("Cast", [a_name], [cast_a], to=site.weight.compute_dtype,
                                              name=names.fresh(f"{stem}/lora_A_cast")))
                nodes.append(helper.make_node("Cast", [b_name], [cast_b], to=site.weight.compute_dtype,
                                              name=names.fresh(f"{stem}/lora_B_cast")))
                a_name, b_name = cast_a, cast_b
            base_output = names.fresh(f"{site.output}/lora_base")
            delta = names.fresh(f"{stem}/lora_delta")
            node.output[0] = base_output
            nodes.extend(_branch_nodes(site, a_name, b_name, delta, names))
            add = names.fresh(f"{stem}/lora_add")
            nodes.append(helper.make_node("Add", [base_output, delta], [site.output], name=add))
            inserts[site.node_index] = nodes
    ordered: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(inserts.get(position, []))
    del graph.node[:]
    graph.node.extend(ordered)
    if constants is None:
        info = {"model_version": model_version, "slots": [slot.to_dict() for slot in emitted]}
        helper.set_model_props(
            result,
            {p.key: p.value for p in model.metadata_props if p.key != LORA_METADATA_KEY}
            | {LORA_METADATA_KEY: json.dumps(info)},
        )
    return result


def lora_info(model: onnx.ModelProto, where: str = "model") -> LoraModelInfo:
    """The adapter slots an adapter model declares.

    Raises:
        ModelError: the model is not one written by ``onnxsvd extract``.
    """
    props = {p.key: p.value for p in model.metadata_props}
    if LORA_METADATA_KEY not in props:
        raise ModelError(
            f"{where} declares no LoRA adapter inputs (no {LORA_METADATA_KEY!r} metadata); pass the base_lora.onnx "
            "written by 'onnxsvd extract'"
        )
    try:
        data = json.loads(props[LORA_METADATA_KEY])
        slots = tuple(
            LoraSlot(**(slot | {"sites": tuple(slot["sites"])})) for slot in data["slots"]
        )
        return LoraModelInfo(model_version=int(data["model_version"]), slots=slots)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{where} has unreadable {LORA_METADATA_KEY!r} metadata ({error}); re-run extract") from error


def adapter_values(
    slots: Sequence[LoraSlot], factors: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Every adapter input of ``slots``: the factors of the groups in ``factors`` (cast to the slot's dtype),
    rank-0 factors for the others (ONNX Runtime needs a value for each of a pair it feeds)."""
    values: dict[str, np.ndarray] = {}
    for slot in slots:
        np_dtype = helper.tensor_dtype_to_np_dtype(slot.dtype)
        a, b = factors.get(slot.key, slot.empty())
        values[slot.a_name] = np.ascontiguousarray(a, dtype=np_dtype)  # [K, r]
        values[slot.b_name] = np.ascontiguousarray(b, dtype=np_dtype)  # [r, N]
    return values
