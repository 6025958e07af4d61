"""Removing what a rewrite left unread: dead weight-chain nodes, unused initializers, stale value_info.

The graph is linked by onnx-ir, whose values know their uses: removing a node drops its reads, so one
sweep from the last node to the first removes a whole dead chain (``Constant → Transpose → Cast``)
without rebuilding an index. The protobuf stays the model: the nodes and initializers onnx-ir says are
dead are deleted from it in place, so no tensor is copied and external data is never read.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnxsvd.graph.match import CHAIN_OPS

__all__ = ["DEAD_WEIGHT_OPS", "RemoveDeadWeightsPass", "remove_dead_weights"]

#: Ops a weight reaches a site through; once nothing reads their outputs they are removed.
DEAD_WEIGHT_OPS = ("Constant", *CHAIN_OPS)


class RemoveDeadWeightsPass(ir.passes.InPlacePass):
    """Remove weight-chain nodes whose outputs nobody reads, then initializers nobody reads.

    Other dead nodes stay: the rewrite removes only what it made dead (a weight whose site now reads
    factors), never a node the model's author put there. Graph inputs and outputs are never removed.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        graph_outputs = frozenset(graph.outputs)
        graph_inputs = frozenset(graph.inputs)
        removed = 0
        for node in reversed(graph):
            unread = all(not value.uses() and value not in graph_outputs for value in node.outputs)
            if node.op_type in DEAD_WEIGHT_OPS and unread:
                graph.remove(node, safe=True)
                removed += 1
        for value in list(graph.initializers.values()):
            if not value.uses() and value not in graph_outputs and value not in graph_inputs:
                del graph.initializers[value.name]
                removed += 1
        return ir.passes.PassResult(model, modified=bool(removed))


def remove_dead_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove weight-chain nodes (Constant, Transpose, Cast, Identity, DequantizeLinear) whose outputs
    nobody reads any more, then initializers nobody reads, then stale ``value_info`` entries.

    ``model`` is changed in place and returned.
    """
    graph = model.graph
    linked = ir.serde.deserialize_graph(graph)
    nodes = list(linked)  # in graph.node's order
    RemoveDeadWeightsPass()(ir.Model(linked, ir_version=model.ir_version))
    kept = {id(node) for node in linked}
    for position in reversed(range(len(nodes))):
        if id(nodes[position]) not in kept:
            del graph.node[position]
    for position in reversed(range(len(graph.initializer))):
        if graph.initializer[position].name not in linked.initializers:
            del graph.initializer[position]
    alive = {value.name for value in linked.inputs} | set(linked.initializers)
    alive.update(value.name for node in linked for value in node.outputs if value.name)
    for position in reversed(range(len(graph.value_info))):
        if graph.value_info[position].name not in alive:
            del graph.value_info[position]
    return model
