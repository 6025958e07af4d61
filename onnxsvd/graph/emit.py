"""Replacing sites by their factor chains; names; cleanup; shared weights.

For a site in normal form ``Y = X · W_kn (+ bias)`` and factors ``W_kn ≈ Σ_i A_i B_i``
(``A_i`` ``[K, r_i]``, ``B_i`` ``[r_i, N]``) the emitted graph is

- right-hand weight: ``H = X · A``, ``Y = H · B`` (Gemm sites keep ``transA`` on the first node and
  ``C``, ``β`` on the last);
- left-hand weight (the mirror, ``W = W_knᵀ``): ``H = Aᵀ · X``, ``Y = Bᵀ · H``;

with ``layout="fused"`` the stages concatenated into one ``A`` and one ``B`` (two nodes, the fast form),
or with ``layout="stages"`` one chain per stage summed by ``Add`` (the bias on stage 1, so trailing
stages can be dropped). Factors are stored as initializers — never as a constant ``A·B`` subgraph, which
a constant folder would make dense again. Sites that share a weight share its factors.
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
from onnxsvd.graph.match import Site

if TYPE_CHECKING:
    from onnxsvd.io import DataFile

__all__ = ["EmitOptions", "FactorTensors", "emit", "storage_dtype_for", "remove_dead_weights"]  # the last from cleanup


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
        self.made: dict[tuple[str, int, str, bool, int], str] = {}  # … and the compute dtype → name read
        self.pieces: dict[tuple[str, str, bool, int], list[tuple[str, str]]] = {}
        self.group_base: dict[str, str] = {}
        self.frame: dict[str, bool] = {}  # per group, the kn_transposed its factors were computed for
        self.pending_casts: list[onnx.NodeProto] = []  # Casts and Transposes of factors, not yet placed

    def prepare(self, sites: Sequence[Site], factorization: Factorization, storage: int, layout: str) -> None:
        """Create the initializers every site of one group will read."""
        for site in sites:
            self.names_for(site, factorization, storage, layout)

    def names_for(
        self, site: Site, factorization: Factorization | None, storage: int, layout: str
    ) -> list[tuple[str, str]]:
        """Per chain (one fused, or one per stage), the names of the two constants the site's nodes read.

        A group's factors ``A`` ``[K, r]``, ``B`` ``[r, N]`` are those of the first of its sites seen here
        (the site it was factorized for, the first in graph order). A site reading the weight the other way
        round (:attr:`Site.kn_transposed` differs) has ``W_kn = Wᵀ ≈ Bᵀ·Aᵀ``: its first factor is ``Bᵀ``
        and its second ``Aᵀ``. Each factor is stored once; a site that needs it transposed reads it
        through a ``Transpose`` node, so shared factors are never stored twice.
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
        names: list[tuple[str, str]] = []
        for stage, (a, b) in enumerate(pieces):
            stage_id = -1 if layout == "fused" else stage
            roles = (("a", a), ("b", b)) if not flipped else (("b", b), ("a", a))  # A [K, r], B [r, N]
            first, second = (self._tensor(site, stage_id, which, value, transposed, storage) for which, value in roles)
            names.append((first, second))
        self.pieces[key] = names
        return names

    def _tensor(self, site: Site, stage: int, which: str, value: np.ndarray, transposed: bool, storage: int) -> str:
        """Name of the tensor the site's node reads for factor ``which`` (``"a"``/``"b"``) of ``stage``.

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
            counterpart = self._tensor(site, stage, which, value, not transposed, storage)
            consumed = self.names.fresh(f"{counterpart}.T")
            self.pending_casts.append(helper.make_node("Transpose", [counterpart], [consumed], name=consumed))
            self.made[key] = consumed
            return consumed
        if stored is None:
            stored = self._initializer(site, stage, which, value.T if transposed else value, transposed, storage)
            self.stored[(site.group, stage, which, transposed)] = stored
        consumed = stored
        if storage != compute:
            consumed = self.names.fresh(f"{stored}.cast")
            self.pending_casts.append(helper.make_node("Cast", [stored], [consumed], name=consumed, to=compute))
        self.made[key] = consumed
        return consumed

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
    factors: Sequence[tuple[str, str]],
    names: _Names,
    opset: int,
    broadcast: int = 0,
) -> list[onnx.NodeProto]:
    """The nodes that compute ``site.output`` from ``site.activation`` through the factor tensors.

    ``factors`` holds, per chain (one fused chain or one per stage), the names of the first and second
    constant the nodes read (``A``/``B`` for the right form, ``Aᵀ``/``Bᵀ`` for the mirror).
    ``broadcast`` is the site's own Gemm ``broadcast`` attribute (opset ≤ 6 only), kept on the node
    that carries ``C``: Gemm-6 broadcasts ``C`` only when it is set.
    """
    nodes: list[onnx.NodeProto] = []
    gemm = site.op_type == "Gemm"
    chain_outputs: list[str] = []
    for position, (first, second) in enumerate(factors):
        tag = "svd" if len(factors) == 1 else f"svd_s{position + 1}"
        hidden = names.fresh(f"{site.output}/{tag}_h")
        carries_bias = position == 0 and site.bias is not None
        out = site.output if len(factors) == 1 else names.fresh(f"{site.output}/{tag}_y")
        activation = site.activation
        if gemm and site.transpose_activation and opset < 11:
            # Old opsets need C on every Gemm; transpose the activation and use MatMul instead.
            transposed = names.fresh(f"{site.activation}/{tag}_t")
            transpose_name = names.fresh(f"{site.name}/{tag}_t")
            nodes.append(helper.make_node("Transpose", [activation], [transposed], name=transpose_name))
            activation = transposed
        if site.weight_side == "right":
            first_inputs, second_inputs = [activation, first], [hidden, second]
        else:
            first_inputs, second_inputs = [first, activation], [second, hidden]
        first_name, second_name = names.fresh(f"{site.name}/{tag}_a"), names.fresh(f"{site.name}/{tag}_b")
        if gemm and opset >= 11:
            trans = {"transA": 1} if site.weight_side == "right" else {"transB": 1}
            nodes.append(
                helper.make_node(
                    "Gemm", first_inputs, [hidden], name=first_name, **(trans if site.transpose_activation else {})
                )
            )
        else:
            nodes.append(helper.make_node("MatMul", first_inputs, [hidden], name=first_name))
        if gemm and carries_bias:
            attrs: dict[str, float | int] = {"beta": site.beta} if site.beta != 1.0 else {}
            if broadcast:
                attrs["broadcast"] = broadcast
            nodes.append(helper.make_node("Gemm", second_inputs + [site.bias], [out], name=second_name, **attrs))
        elif gemm and opset >= 11:
            nodes.append(helper.make_node("Gemm", second_inputs, [out], name=second_name))
        else:
            nodes.append(helper.make_node("MatMul", second_inputs, [out], name=second_name))
        chain_outputs.append(out)
    # Stages layout: Y = y_1 + y_2 + …, the last Add writing the site's output.
    total = chain_outputs[0]
    for position, term in enumerate(chain_outputs[1:], start=1):
        last = position == len(chain_outputs) - 1
        out = site.output if last else names.fresh(f"{site.output}/svd_sum{position}")
        nodes.append(helper.make_node("Add", [total, term], [out], name=names.fresh(f"{site.name}/svd_add{position}")))
        total = out
    return nodes


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
    for site in sites:
        factor_names = tensors.names_for(
            site, factorizations.get(site.group), storage_dtypes[site.group], options.layout
        )
        broadcast = _broadcast(graph.node[site.node_index]) if opset < 7 else 0
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
