"""Replacing sites by their factor chains; names; cleanup; shared weights.

For a site in normal form ``Y = X · W_kn (+ bias)`` and factors ``W_kn ≈ Σ_i A_i B_i``
(``A_i`` ``[K, r_i]``, ``B_i`` ``[r_i, N]``) the emitted graph is

- right-hand weight: ``H = X · A``, ``Y = H · B`` (Gemm sites keep ``transA`` on the first node and
  ``C``, ``β`` on the last);
- left-hand weight (the mirror, ``W = W_knᵀ``): ``H = Aᵀ · X``, ``Y = Bᵀ · H``;
- a Conv: two Convs whose weights are the factors reshaped (:mod:`onnxsvd.graph.conv`);

with ``layout="fused"`` the stages concatenated into one ``A`` and one ``B`` (two nodes, the fast form),
or with ``layout="stages"`` one chain per stage summed by ``Add`` (the bias on stage 1, so trailing
stages can be dropped). Factors are stored as initializers — never as a constant ``A·B`` subgraph, which
a constant folder would make dense again. Sites that share a weight share its factors.

Every node written carries a :class:`onnxsvd.graph.records.ChainRecord` (site, stage, role, weight side,
factor initializer names, rank) in its ``metadata_props``: ``finetune`` reads the chains from them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsvd.factorize import Factorization
from onnxsvd.graph.cleanup import remove_dead_weights
from onnxsvd.graph.conv import conv_first_weight, conv_pair, conv_second_weight
from onnxsvd.graph.match import Site
from onnxsvd.graph.records import FUSED, ChainRecord, write_record

if TYPE_CHECKING:
    from onnxsvd.io import DataFile

# remove_dead_weights is cleanup's, exported here too.
__all__ = ["ChainFactors", "EmitOptions", "FactorTensors", "emit", "storage_dtype_for", "remove_dead_weights"]


@dataclasses.dataclass(frozen=True)
class EmitOptions:
    """How factors are laid out in the graph.

    Attributes:
        layout: ``"fused"`` or ``"stages"``.
    """

    layout: str = "fused"


def storage_dtype_for(site: Site, requested: str) -> int:
    """ONNX dtype the site's factors are stored in.

    ``"auto"`` keeps the stored weight's own float dtype (an fp16 weight cast to fp32 stays fp16 on
    disk) and falls back to the compute dtype for quantized storage. ``"fp16"``/``"fp32"`` force it.
    """
    if requested == "fp16":
        return onnx.TensorProto.FLOAT16
    if requested == "fp32":
        return onnx.TensorProto.FLOAT
    stored = site.weight.storage_dtype
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return stored if stored in floats else site.weight.compute_dtype


class _Names:
    """Hands out tensor and node names that do not collide with any name already in the model.

    Every name is reserved: node names, inputs and outputs, initializers, graph inputs and outputs and
    ``value_info`` of the main graph and of every subgraph (If/Loop/Scan bodies, at any depth). A fresh
    name equal to a body's local name would break single static assignment, and one equal to a stale
    ``value_info`` entry would inherit its type.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used: set[str] = set()
        self._reserve(graph)

    def _reserve(self, graph: onnx.GraphProto) -> None:
        self.used.update(t.name for t in graph.initializer)
        self.used.update(t.values.name for t in graph.sparse_initializer)
        for values in (graph.input, graph.output, graph.value_info):
            self.used.update(v.name for v in values)
        for node in graph.node:
            self.used.add(node.name)
            self.used.update(node.input)
            self.used.update(node.output)
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    self._reserve(attribute.g)
                for body in attribute.graphs:
                    self._reserve(body)
        self.used.discard("")

    def fresh(self, wanted: str) -> str:
        name, counter = wanted, 1
        while name in self.used:
            name = f"{wanted}_{counter}"
            counter += 1
        self.used.add(name)
        return name


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./:-]", "_", name)


@dataclasses.dataclass(frozen=True)
class ChainFactors:
    """The factors of one chain (the fused chain, or one stage): the initializers and what the nodes read.

    Attributes:
        first_stored: initializer of the first factor (``A`` ``[K, r]``, or ``Aᵀ`` ``[r, K]`` on the left).
        second_stored: initializer of the second factor (``B`` ``[r, N]``, or ``Bᵀ`` ``[N, r]``).
        first: the tensor the first node reads (the initializer, or its Cast to the compute dtype).
        second: the tensor the second node reads.
        rank: r.
    """

    first_stored: str
    second_stored: str
    first: str
    second: str
    rank: int


class FactorTensors:
    """Creates each group's factor initializers (and Casts, if stored in another dtype) once per side.

    ``prepare`` can run as soon as a group is factorized, so its arrays can be dropped at once (factors
    then live only as initializer bytes, or only on disk with a ``data_file``: each factor is written to
    the output's data file as it is made and its initializer points there); ``emit`` later reads the
    names back.
    """

    def __init__(self, model: onnx.ModelProto, data_file: DataFile | None = None) -> None:
        self.graph = model.graph
        self.data_file = data_file
        self.names = _Names(model.graph)
        self.stored: dict[tuple[str, int, str, bool], str] = {}  # (group, stage, a/b, transposed) → initializer
        # … and the compute dtype → (initializer, the tensor the nodes read)
        self.made: dict[tuple[str, int, str, bool, int], tuple[str, str]] = {}
        self.pieces: dict[tuple[str, str, bool, int], list[ChainFactors]] = {}
        self.group_base: dict[str, str] = {}
        self.frame: dict[str, bool] = {}  # per group, the kn_transposed its factors were computed for
        self.pending_casts: list[onnx.NodeProto] = []  # Casts and Transposes of factors, not yet placed

    def prepare(self, sites: Sequence[Site], factorization: Factorization, storage: int, layout: str) -> None:
        """Create the initializers every site of one group will read."""
        for site in sites:
            self.names_for(site, factorization, storage, layout)

    def names_for(
        self, site: Site, factorization: Factorization | None, storage: int, layout: str
    ) -> list[ChainFactors]:
        """Per chain (one fused, or one per stage), the factor initializers and the tensors the nodes read.

        A group's factors ``A`` ``[K, r]``, ``B`` ``[r, N]`` are those of the first of its sites seen here
        (the site it was factorized for, the first in graph order). A site reading the weight the other way
        round (:attr:`Site.kn_transposed` differs) has ``W_kn = Wᵀ ≈ Bᵀ·Aᵀ``: its first factor is ``Bᵀ``
        and its second ``Aᵀ``. Each factor is stored once; a site that needs it transposed reads it
        through a ``Transpose`` node, so shared factors are never stored twice. ``first_stored`` and
        ``second_stored`` name the initializers the site's factors come from.
        """
        flipped = site.kn_transposed != self.frame.setdefault(site.group, site.kn_transposed)
        key = (site.group, site.weight_side, flipped, site.weight.compute_dtype)
        if key in self.pieces:
            return self.pieces[key]
        if factorization is None:
            raise KeyError(f"factors of {site.name!r} were neither prepared nor given")
        pieces = [factorization.fused()] if layout == "fused" else list(factorization.stages)
        # Right form: the nodes read (A, B) of the site's own W_kn; the mirror reads (Aᵀ, Bᵀ).
        transposed = (site.weight_side == "left") != flipped
        names: list[ChainFactors] = []
        for stage, (a, b) in enumerate(pieces):
            stage_id = -1 if layout == "fused" else stage
            roles = (("a", a), ("b", b)) if not flipped else (("b", b), ("a", a))  # A [K, r], B [r, N]
            if site.conv is not None:  # stored as the two Convs' weights: [r, C, k…] and [N, r, 1…]
                roles = (("a", conv_first_weight(a, site.conv)), ("b", conv_second_weight(b, site.conv)))
            first, second = (self._tensor(site, stage_id, which, value, transposed, storage) for which, value in roles)
            names.append(ChainFactors(first[0], second[0], first[1], second[1], int(a.shape[1])))
        self.pieces[key] = names
        return names

    def _tensor(
        self, site: Site, stage: int, which: str, value: np.ndarray, transposed: bool, storage: int
    ) -> tuple[str, str]:
        """(initializer, tensor the site's node reads) for factor ``which`` (``"a"``/``"b"``) of ``stage``.

        ``value`` is the group's factor in its normal form; ``transposed`` asks for ``valueᵀ``: stored so
        when it is the first form asked for, else a ``Transpose`` of the stored form. A site computing in
        another dtype than the storage reads it through a ``Cast`` (one per dtype: the sites of a group may
        compute in different dtypes when a chain widens the weight, fp16 → fp32).
        """
        compute = site.weight.compute_dtype
        key = (site.group, stage, which, transposed, compute)
        if key in self.made:
            return self.made[key]
        stored = self.stored.get((site.group, stage, which, transposed))
        if stored is None and (site.group, stage, which, not transposed) in self.stored:
            initializer, counterpart = self._tensor(site, stage, which, value, not transposed, storage)
            consumed = self.names.fresh(f"{counterpart}.T")
            self.pending_casts.append(helper.make_node("Transpose", [counterpart], [consumed], name=consumed))
            self.made[key] = (initializer, consumed)
            return initializer, consumed
        if stored is None:
            stored = self._initializer(site, stage, which, value.T if transposed else value, transposed, storage)
            self.stored[(site.group, stage, which, transposed)] = stored
        consumed = stored
        if storage != compute:
            consumed = self.names.fresh(f"{stored}.cast")
            self.pending_casts.append(helper.make_node("Cast", [stored], [consumed], name=consumed, to=compute))
        self.made[key] = (stored, consumed)
        return stored, consumed

    def _initializer(
        self, site: Site, stage: int, which: str, value: np.ndarray, transposed: bool, storage: int
    ) -> str:
        """Store ``value`` (the factor as the nodes read it) as a fresh initializer in ``storage``."""
        base = self.group_base.get(site.group)
        if base is None:
            base = self.names.fresh(_clean(site.weight.tensor) + ".svd")
            self.group_base[site.group] = base
        stage_part = "" if stage < 0 else f"_s{stage + 1}"
        side_part = "_t" if transposed else ""
        name = self.names.fresh(f"{base}{stage_part}_{which}{side_part}")
        array = np.ascontiguousarray(value.astype(helper.tensor_dtype_to_np_dtype(storage)))
        if self.data_file is not None:
            self.graph.initializer.append(self.data_file.tensor(array, name))
        else:
            self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _broadcast(node: onnx.NodeProto) -> int:
    """Gemm's ``broadcast`` attribute (opsets 1–6; removed in 7, where C always broadcasts)."""
    for attribute in node.attribute:
        if attribute.name == "broadcast":
            return int(helper.get_attribute_value(attribute))
    return 0


def _chain_nodes(
    site: Site,
    factors: Sequence[ChainFactors],
    names: _Names,
    opset: int,
    broadcast: int = 0,
) -> list[onnx.NodeProto]:
    """The nodes that compute ``site.output`` from ``site.activation`` through the factor tensors.

    ``factors`` holds, per chain (one fused chain or one per stage), the factors the nodes read (``A``/``B``
    for the right form, ``Aᵀ``/``Bᵀ`` for the mirror). ``broadcast`` is the site's own Gemm ``broadcast``
    attribute (opset ≤ 6 only), kept on the node that carries ``C``: Gemm-6 broadcasts ``C`` only when it
    is set. Every node carries its :class:`ChainRecord`.
    """
    nodes: list[onnx.NodeProto] = []
    gemm = site.op_type == "Gemm"
    chain_outputs: list[str] = []

    def add(node: onnx.NodeProto, stage: int, role: str, chain: ChainFactors) -> None:
        record = ChainRecord(site.name, stage, role, site.weight_side, chain.first_stored, chain.second_stored,
                             chain.rank)
        write_record(node, record)
        nodes.append(node)

    for position, chain in enumerate(factors):
        stage = FUSED if len(factors) == 1 else position + 1
        tag = "svd" if len(factors) == 1 else f"svd_s{position + 1}"
        hidden = names.fresh(f"{site.output}/{tag}_h")
        carries_bias = position == 0 and site.bias is not None
        out = site.output if len(factors) == 1 else names.fresh(f"{site.output}/{tag}_y")
        activation = site.activation
        if gemm and site.transpose_activation and opset < 11:
            # Old opsets need C on every Gemm; transpose the activation and use MatMul instead.
            transposed = names.fresh(f"{site.activation}/{tag}_t")
            transpose_name = names.fresh(f"{site.name}/{tag}_t")
            add(helper.make_node("Transpose", [activation], [transposed], name=transpose_name), stage, "transpose",
                chain)
            activation = transposed
        if site.conv is not None:
            first_name, second_name = names.fresh(f"{site.name}/{tag}_a"), names.fresh(f"{site.name}/{tag}_b")
            first, second = conv_pair(
                site.conv, activation, chain.first, chain.second, hidden, out, site.bias if carries_bias else None,
                first_name, second_name,
            )
            add(first, stage, "first", chain)
            add(second, stage, "second", chain)
            chain_outputs.append(out)
            continue
        if site.weight_side == "right":
            first_inputs, second_inputs = [activation, chain.first], [hidden, chain.second]
        else:
            first_inputs, second_inputs = [chain.first, activation], [chain.second, hidden]
        first_name, second_name = names.fresh(f"{site.name}/{tag}_a"), names.fresh(f"{site.name}/{tag}_b")
        if gemm and opset >= 11:
            trans = {"transA": 1} if site.weight_side == "right" else {"transB": 1}
            first = helper.make_node(
                "Gemm", first_inputs, [hidden], name=first_name, **(trans if site.transpose_activation else {})
            )
        else:
            first = helper.make_node("MatMul", first_inputs, [hidden], name=first_name)
        add(first, stage, "first", chain)
        if gemm and carries_bias:
            attrs: dict[str, float | int] = {"beta": site.beta} if site.beta != 1.0 else {}
            if broadcast:
                attrs["broadcast"] = broadcast
            second = helper.make_node("Gemm", second_inputs + [site.bias], [out], name=second_name, **attrs)
        elif gemm and opset >= 11:
            second = helper.make_node("Gemm", second_inputs, [out], name=second_name)
        else:
            second = helper.make_node("MatMul", second_inputs, [out], name=second_name)
        add(second, stage, "second", chain)
        chain_outputs.append(out)
    # Stages layout: Y = y_1 + y_2 + …, the last Add writing the site's output; each Add records the stage
    # it adds.
    total = chain_outputs[0]
    for position, term in enumerate(chain_outputs[1:], start=1):
        last = position == len(chain_outputs) - 1
        out = site.output if last else names.fresh(f"{site.output}/svd_sum{position}")
        node = helper.make_node("Add", [total, term], [out], name=names.fresh(f"{site.name}/svd_add{position}"))
        add(node, position + 1, "sum", factors[position])
        total = out
    return nodes


def _record_casts(
    site: Site, pending: Sequence[onnx.NodeProto], factors: Sequence[ChainFactors]
) -> list[onnx.NodeProto]:
    """Record on each Cast (and Transpose) of factors that ``site``'s chains read the chain that reads it;
    returns the others (those of sites emitted later).

    Sites that share a weight share these nodes: each records the first site emitted that reads it. A site
    reading a shared factor the other way round reads it through a ``Transpose`` (role ``transpose``),
    maybe of a ``Cast``.
    """
    reads: dict[str, tuple[int, ChainFactors]] = {}
    for position, chain in enumerate(factors):
        reads.update({chain.first: (position, chain), chain.second: (position, chain)})
    others: list[onnx.NodeProto] = []
    for node in reversed(pending):  # a Transpose comes after the Cast it reads
        found = reads.get(node.output[0])
        if found is None:
            others.append(node)
            continue
        position, chain = found
        stage = FUSED if len(factors) == 1 else position + 1
        role = "cast" if node.op_type == "Cast" else "transpose"
        write_record(node, ChainRecord(site.name, stage, role, site.weight_side, chain.first_stored,
                                       chain.second_stored, chain.rank))
        reads[node.input[0]] = found
    return list(reversed(others))


def emit(
    model: onnx.ModelProto,
    factorizations: Mapping[str, Factorization],
    sites: Sequence[Site],
    storage_dtypes: Mapping[str, int],
    options: EmitOptions = EmitOptions(),
    tensors: FactorTensors | None = None,
) -> onnx.ModelProto:
    """Replace ``sites`` in ``model`` (mutated in place and returned) by their factor chains.

    Args:
        model: the model the sites were matched in (node indices must still hold).
        factorizations: factors per site *group* (``site.group``); groups already prepared in
            ``tensors`` may be left out.
        sites: the sites to replace; others stay as they are.
        storage_dtypes: ONNX dtype of the factors per group.
        options: layout.
        tensors: the factor initializers made so far for this model (see :class:`FactorTensors`).
    """
    graph = model.graph
    tensors = tensors or FactorTensors(model)
    names = tensors.names
    opset = _opset(model)
    chains_for: dict[int, list[onnx.NodeProto]] = {}
    unrecorded: list[onnx.NodeProto] = []  # Casts made in `prepare` for groups whose sites come later
    for site in sites:
        factor_names = tensors.names_for(
            site, factorizations.get(site.group), storage_dtypes[site.group], options.layout
        )
        broadcast = _broadcast(graph.node[site.node_index]) if opset < 7 else 0
        unrecorded = _record_casts(site, unrecorded + tensors.pending_casts, factor_names)
        chains_for[site.node_index] = tensors.pending_casts + _chain_nodes(
            site, factor_names, names, opset, broadcast
        )
        tensors.pending_casts = []
    rebuilt: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        rebuilt.extend(chains_for.get(position, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    remove_dead_weights(model)
    return model
