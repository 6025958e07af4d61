"""Graph side of the rewrite: matching sites and emitting their factor chains. Only here and in
``onnxsvd.io`` is ``onnx`` imported."""

from __future__ import annotations

from onnxsvd.graph.cleanup import RemoveDeadWeightsPass
from onnxsvd.graph.conv import conv_flops
from onnxsvd.graph.emit import EmitOptions, FactorTensors, emit, remove_dead_weights, storage_dtype_for
from onnxsvd.graph.emit_quant import QUANTIZED_OPS, QuantizedGroup, activation_ranks, emit_quantized
from onnxsvd.graph.match import (
    ConvGeometry,
    GraphIndex,
    Match,
    Site,
    Skip,
    WeightSource,
    conv_matrix,
    conv_site_in_form,
    dtype_name,
    find_sites,
    load_weight,
    node_name,
)

__all__ = [
    "ConvGeometry",
    "conv_flops",
    "conv_matrix",
    "conv_site_in_form",
    "EmitOptions",
    "FactorTensors",
    "GraphIndex",
    "Match",
    "QUANTIZED_OPS",
    "QuantizedGroup",
    "RemoveDeadWeightsPass",
    "Site",
    "Skip",
    "WeightSource",
    "activation_ranks",
    "dtype_name",
    "emit",
    "emit_quantized",
    "find_sites",
    "load_weight",
    "node_name",
    "remove_dead_weights",
    "storage_dtype_for",
]
