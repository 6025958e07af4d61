"""Emitting a quantized site: ONNX Runtime's ``MatMulNBits`` base plus a low-rank correction branch.

For a site in normal form ``Y = X · W_kn (+ bias)``, with ``Ŵ`` the dequantized base and ``A`` ``[K, r]``,
``B`` ``[r, N]`` the correction of ``E = W_kn − Ŵ``, the emitted graph computes, with ``X_nf`` the
activation in normal form (``[..., K]``):

    Z = MatMulNBits(X_nf) + (X_nf · A) · B          # [..., N]; the branch is left out at rank 0

- ``X_nf = X``, or ``X`` with its last two axes swapped when the site reads it transposed (Gemm ``transA``
  with the weight on the right; ``W · X`` with the weight on the left, where K is the second-last axis;
  Gemm with ``A`` constant and no ``transB``).
- weight on the left (``Y = W · X``): ``Y = Zᵀ`` (last two axes swapped back).
- int8 factors (``--factor-dtype int8``): ``A`` and ``B`` are ``DequantizeLinear`` of int8 initializers with
  one scale per rank component (``axis=1`` for ``A``, ``axis=0`` for ``B``).
- Gemm's ``β·C`` is added last (``α`` is already in ``W_kn``, hence in the base and the branch).
- fused branch (``--branch fused``): ``[Z_base | H] = MatMulNBits_{[W | A]}(X_nf)`` (``N + r`` outputs),
  ``Split`` on the last axis into ``N`` and ``r``, then ``Z = Z_base + H · B``.

Every node of a corrected site carries a :class:`~onnxsvd.graph.records.ChainRecord` (roles ``base``,
``first``, ``second``, ``sum``; fused: ``base``, ``split``, ``second``, ``sum``, with ``factor_a`` naming
the fused packed weight that holds ``Â``).

The MatMulNBits node is built as ONNX Runtime's quantizer builds it (domain ``com.microsoft``, attributes
``K``, ``N``, ``bits``, ``block_size`` and ``accuracy_level``, its tensors as the quantizer wrote them), and
the model's ``opset_import`` declares ``com.microsoft``. Sites that share a weight share its base and its
factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsvd.factorize import Factorization, quantize_int8
from onnxsvd.graph.cleanup import remove_dead_weights
from onnxsvd.graph.emit import ChainFactors, FactorTensors, _clean
from onnxsvd.graph.match import Site
from onnxsvd.graph.records import FUSED, ChainRecord, write_record

if TYPE_CHECKING:
    from onnxsvd.quantize import QuantizedWeight

__all__ = ["MS_DOMAIN", "QuantizedGroup", "activation_ranks", "emit_quantized", "QUANTIZED_OPS"]

#: The domain of ONNX Runtime's contrib ops.
MS_DOMAIN = "com.microsoft"
#: Ops that hold an already quantized linear layer (left as they are; listed in the report).
QUANTIZED_OPS = ("MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                 "QGemm", "QLinearConv", "ConvInteger", "GatherBlockQuantized")


@dataclasses.dataclass
class QuantizedGroup:
    """One weight group to emit: its sites, its quantized base, and the correction of its error.

    Attributes:
        sites: the sites reading the weight (one base and one correction for all).
        weight: ONNX Runtime's quantized tensors of ``W_kn``.
        factorization: the correction ``E ≈ Σ A_i B_i`` (stages concatenated), ``None`` at rank 0.
        storage: ONNX dtype of the correction factors (``INT8``: stored with a scale per rank component and
            read through ``DequantizeLinear``).
        fused: the fused branch (``--branch fused``): ``[W | A]`` quantized together ``[K, N + r]``; the
            emitted ``MatMulNBits`` reads it and only ``B`` is stored as a factor (``weight`` is then ``W``'s
            own quantization, for the report).
    """

    sites: list[Site]
    weight: QuantizedWeight
    factorization: Factorization | None
    storage: int
    fused: QuantizedWeight | None = None


def activation_ranks(model: onnx.ModelProto, sites: Sequence[Site]) -> dict[str, int | None]:
    """The rank of each site's activation where the emitter needs it (``W · X`` MatMul sites, whose
    transposes need it), from shape inference; ``None`` where it is not known."""
    needed = [site for site in sites if site.op_type == "MatMul" and site.weight_side == "left"]
    if not needed:
        return {}
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks: dict[str, int] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            ranks[value.name] = len(tensor.shape.dim)
    return {site.name: ranks.get(site.activation) for site in needed}


def _swap_last(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def _declare_domain(model: onnx.ModelProto) -> None:
    if not any(entry.domain == MS_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


class _BaseTensors:
    """The MatMulNBits initializers of each group (and its int8 factors), made once and shared by its sites."""

    def __init__(self, tensors: FactorTensors) -> None:
        self.tensors = tensors
        self.made: dict[str, list[str]] = {}
        self.int8_made: dict[str, ChainFactors] = {}
        self.second_made: dict[str, ChainFactors] = {}

    def _initializer(self, wanted: str, array: np.ndarray) -> str:
        name = self.tensors.names.fresh(wanted)
        array = np.ascontiguousarray(array)
        data_file = self.tensors.data_file
        tensor = data_file.tensor(array, name) if data_file is not None else numpy_helper.from_array(array, name)
        self.tensors.graph.initializer.append(tensor)
        return name

    def int8_factors(self, site: Site, factorization: Factorization) -> tuple[ChainFactors, list[onnx.NodeProto]]:
        """``A`` and ``B`` as the graph computes them (``DequantizeLinear`` of int8 with a scale per rank
        component; ``first_stored``/``second_stored`` name the int8 initializers), and the nodes that make
        them (only for the group's first site)."""
        if site.group in self.int8_made:
            return self.int8_made[site.group], []
        a, b = factorization.fused()  # [K, r], [r, N]: the values q·s the fit used
        compute = helper.tensor_dtype_to_np_dtype(site.weight.compute_dtype)
        base = _clean(site.weight.tensor) + ".lowrank"
        nodes, outputs, payloads = [], [], []
        for which, factor, axis in (("a", a, 1), ("b", b, 0)):
            quantized, scale = quantize_int8(factor, axis, compute)  # int8 [K, r] / [r, N], scales [r]
            payload = self._initializer(f"{base}_{which}_q", quantized)
            scales = self._initializer(f"{base}_{which}_scale", scale)
            value = self.tensors.names.fresh(f"{base}_{which}")
            nodes.append(helper.make_node(
                "DequantizeLinear", [payload, scales], [value], name=self.tensors.names.fresh(f"{base}_{which}_dq"),
                axis=axis,
            ))
            outputs.append(value)
            payloads.append(payload)
        self.int8_made[site.group] = ChainFactors(payloads[0], payloads[1], outputs[0], outputs[1], int(a.shape[1]))
        return self.int8_made[site.group], nodes

    def second_factor(self, site: Site, factorization: Factorization, storage: int) -> ChainFactors:
        """The fused branch's ``B`` ``[r, N]`` (stored once per group, read through a Cast when the storage
        differs from the compute dtype); ``first``/``first_stored`` name the fused packed weight."""
        if site.group in self.second_made:
            return self.second_made[site.group]
        _, b = factorization.fused()  # [r, N]
        normal = dataclasses.replace(site, weight_side="right")
        stored, read = self.tensors._tensor(normal, -1, "b", b, False, storage)
        packed = self.made[site.group][0]
        self.second_made[site.group] = ChainFactors(packed, stored, packed, read, int(b.shape[0]))
        return self.second_made[site.group]

    def names(self, site: Site, weight: QuantizedWeight) -> list[str]:
        if site.group in self.made:
            return self.made[site.group]
        base = _clean(site.weight.tensor)
        bits = weight.attributes.get("bits", 4)
        arrays = [(f"{base}_Q{bits}", weight.packed), (f"{base}_scales", weight.scales)]
        if weight.zero_points is not None:
            arrays.append((f"{base}_zero_points", weight.zero_points))
        names = [self._initializer(wanted, array) for wanted, array in arrays]
        self.made[site.group] = names
        return names


def _site_nodes(
    site: Site,
    group: QuantizedGroup,
    base_names: list[str],
    chain: ChainFactors | None,
    tensors: FactorTensors,
    rank: int | None,
    opset: int = 17,
) -> list[onnx.NodeProto]:
    """The nodes computing ``site.output`` from ``site.activation`` (see the module docstring).

    The base, the branch's two MatMuls and their Add carry a :class:`ChainRecord` (roles ``base``,
    ``first``, ``second``, ``sum``; the normal form's side, ``right``), so ``finetune`` finds the branch.
    """
    names = tensors.names
    nodes: list[onnx.NodeProto] = []
    factor_names = (chain.first, chain.second) if chain is not None else None

    def recorded(node: onnx.NodeProto, role: str) -> onnx.NodeProto:
        if chain is not None:
            write_record(node, ChainRecord(site.name, FUSED, role, "right", chain.first_stored,
                                           chain.second_stored, chain.rank))
        return node

    transpose_in = site.channel_axis == -2
    transpose_out = site.weight_side == "left"
    activation_rank = 2 if site.op_type == "Gemm" else rank
    if (transpose_in or transpose_out) and activation_rank is None:
        raise ValueError(f"{site.name}: the activation's rank is needed to transpose it")
    has_bias = site.op_type == "Gemm" and site.bias is not None
    activation = site.activation
    if transpose_in:
        swapped = names.fresh(f"{site.activation}/q_nf")
        transpose = names.fresh(f"{site.name}/q_in_t")
        nodes.append(helper.make_node("Transpose", [activation], [swapped], name=transpose,
                                      perm=_swap_last(activation_rank)))
        activation = swapped
    last_step = not (transpose_out or has_bias)

    def output(tag: str, is_last: bool) -> str:
        return site.output if is_last else names.fresh(f"{site.output}/{tag}")

    fused = group.fused is not None and chain is not None
    attributes = dict((group.fused if fused else group.weight).attributes)  # type: ignore[union-attr]
    if not attributes.get("accuracy_level"):
        attributes.pop("accuracy_level", None)
    base_out = output("q_base", last_step and factor_names is None)
    both = names.fresh(f"{site.output}/q_base_and_h") if fused else base_out
    nodes.append(recorded(helper.make_node(
        "MatMulNBits", [activation, *base_names], [both], name=names.fresh(f"{site.name}/q_base"),
        domain=MS_DOMAIN, **attributes,
    ), "base"))
    current = base_out
    if fused:
        assert chain is not None
        hidden = names.fresh(f"{site.output}/q_corr_h")
        split = helper.make_node("Split", [both], [base_out, hidden], name=names.fresh(f"{site.name}/q_split"),
                                 axis=-1)
        sizes = [site.n, chain.rank]
        if opset >= 13:
            sizes_name = names.fresh(f"{site.name}/q_split_sizes")
            tensors.graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), sizes_name))
            split.input.append(sizes_name)
        else:
            split.attribute.append(helper.make_attribute("split", sizes))
        nodes.append(recorded(split, "split"))
        branch = names.fresh(f"{site.output}/q_corr_y")
        second_name = names.fresh(f"{site.name}/q_corr_b")
        nodes.append(recorded(helper.make_node("MatMul", [hidden, chain.second], [branch], name=second_name), "second"))
        summed = output("q_sum", last_step)
        add = helper.make_node("Add", [current, branch], [summed], name=names.fresh(f"{site.name}/q_add"))
        nodes.append(recorded(add, "sum"))
        current = summed
    elif factor_names is not None:
        first, second = factor_names
        hidden = names.fresh(f"{site.output}/q_corr_h")
        branch = names.fresh(f"{site.output}/q_corr_y")
        first_name, second_name = names.fresh(f"{site.name}/q_corr_a"), names.fresh(f"{site.name}/q_corr_b")
        nodes.append(recorded(helper.make_node("MatMul", [activation, first], [hidden], name=first_name), "first"))
        nodes.append(recorded(helper.make_node("MatMul", [hidden, second], [branch], name=second_name), "second"))
        summed = output("q_sum", last_step)
        add = helper.make_node("Add", [current, branch], [summed], name=names.fresh(f"{site.name}/q_add"))
        nodes.append(recorded(add, "sum"))
        current = summed
    if transpose_out:
        back = output("q_out_t", not has_bias)
        nodes.append(helper.make_node(
            "Transpose", [current], [back], name=names.fresh(f"{site.name}/q_out_t"), perm=_swap_last(activation_rank)
        ))
        current = back
    if has_bias:
        bias = site.bias
        if site.beta != 1.0:
            beta_name = names.fresh(f"{site.name}/q_beta")
            dtype = helper.tensor_dtype_to_np_dtype(site.weight.compute_dtype)
            tensors.graph.initializer.append(numpy_helper.from_array(np.array(site.beta, dtype=dtype), beta_name))
            scaled = names.fresh(f"{site.output}/q_bias")
            mul = names.fresh(f"{site.name}/q_beta_mul")
            nodes.append(helper.make_node("Mul", [bias, beta_name], [scaled], name=mul))
            bias = scaled
        add = names.fresh(f"{site.name}/q_bias_add")
        nodes.append(helper.make_node("Add", [current, bias], [site.output], name=add))
    return nodes


def emit_quantized(
    model: onnx.ModelProto,
    groups: Sequence[QuantizedGroup],
    tensors: FactorTensors | None = None,
    ranks: Mapping[str, int | None] | None = None,
) -> onnx.ModelProto:
    """Replace every site of ``groups`` in ``model`` (mutated in place and returned) by its quantized form.

    Args:
        model: the model the sites were matched in (node indices must still hold).
        groups: the quantized groups.
        tensors: the initializers made so far (and the output's data file, if streaming).
        ranks: activation ranks of ``W · X`` MatMul sites (:func:`activation_ranks`).

    Raises:
        ValueError: a ``W · X`` MatMul site whose activation rank is not in ``ranks``.
    """
    if not groups:
        return model
    tensors = tensors or FactorTensors(model)
    bases = _BaseTensors(tensors)
    ranks = ranks or {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    opset = next((int(entry.version) for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 17)
    for group in groups:
        for site in group.sites:
            fused = group.fused is not None and group.factorization is not None
            base_names = bases.names(site, group.fused if fused else group.weight)  # type: ignore[arg-type]
            chain, made = None, []
            if fused:
                chain = bases.second_factor(site, group.factorization, group.storage)  # type: ignore[arg-type]
            elif group.factorization is not None and group.storage == onnx.TensorProto.INT8:
                chain, made = bases.int8_factors(site, group.factorization)
            elif group.factorization is not None:
                # Every site computes in the normal form X_nf · A · B, whichever side its weight is on.
                normal = dataclasses.replace(site, weight_side="right")
                (chain,) = tensors.names_for(normal, group.factorization, group.storage, "fused")
            casts, tensors.pending_casts = made + tensors.pending_casts, []
            replaced[site.node_index] = casts + _site_nodes(
                site, group, base_names, chain, tensors, ranks.get(site.name), opset
            )
    rebuilt: list[onnx.NodeProto] = []
    for position, node in enumerate(model.graph.node):
        rebuilt.extend(replaced.get(position, [node]))
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    _declare_domain(model)
    remove_dead_weights(model)
    return model
