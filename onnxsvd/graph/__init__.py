"""Graph side of the rewrite: matching sites and emitting their factor chains. Only here and in
``onnxsvd.io`` is ``onnx`` imported."""

from __future__ import annotations

from onnxsvd.graph.cleanup import RemoveDeadWeightsPass
from onnxsvd.graph.emit import EmitOptions, FactorTensors, emit, remove_dead_weights, storage_dtype_for
from onnxsvd.graph.match import GraphIndex, Match, Site, Skip, WeightSource, dtype_name, find_sites, load_weight

__all__ = [
    "EmitOptions",
    "FactorTensors",
    "GraphIndex",
    "Match",
    "RemoveDeadWeightsPass",
    "Site",
    "Skip",
    "WeightSource",
    "dtype_name",
    "emit",
    "find_sites",
    "load_weight",
    "remove_dead_weights",
    "storage_dtype_for",
]
