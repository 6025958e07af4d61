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
    """Remove weight-chain nodes whose outputs nobody reads, then initializers nobody reads, in the main graph
    and in every If/Loop/Scan body.

    Other dead nodes stay: the rewrite removes only what it made dead (a weight whose site now reads
    factors), never a node the model's author put there. Graph inputs and outputs are never removed. The
    innermost bodies are swept first: a weight of an outer scope read only by a dead chain inside a body is
    free once that chain is gone, and one still read inside a body stays.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        removed = 0
        for graph, _ in sorted(_graphs(model.graph), key=lambda pair: -pair[1]):
            graph_outputs = frozenset(graph.outputs)
            graph_inputs = frozenset(graph.inputs)
            for node in reversed(list(graph)):
                unread = all(not value.uses() and value not in graph_outputs for value in node.outputs)
                if node.op_type in DEAD_WEIGHT_OPS and unread:
                    graph.remove(node, safe=True)
                    removed += 1
            for value in list(graph.initializers.values()):
                if not value.uses() and value not in graph_outputs and value not in graph_inputs:
                    del graph.initializers[value.name]
                    removed += 1
        return ir.passes.PassResult(model, modified=bool(removed))


def _graphs(graph: ir.Graph, depth: int = 0) -> list[tuple[ir.Graph, int]]:
    """``graph`` and every body inside it, with its depth (0 for ``graph``)."""
    found = [(graph, depth)]
    for node in graph:
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.GRAPH:
                found.extend(_graphs(attribute.as_graph(), depth + 1))
            elif attribute.type == ir.AttributeType.GRAPHS:
                for body in attribute.as_graphs():
                    found.extend(_graphs(body, depth + 1))
    return found


def _paired(
    proto: onnx.GraphProto, linked: ir.Graph, depth: int = 0
) -> list[tuple[onnx.GraphProto, ir.Graph, list, int]]:
    """Each protobuf graph (main and bodies) with its onnx-ir graph, the latter's nodes as they are now, and
    its depth."""
    nodes = list(linked)
    found = [(proto, linked, nodes, depth)]
    for proto_node, node in zip(proto.node, nodes, strict=True):
        for attribute in proto_node.attribute:
            if attribute.HasField("g"):
                found.extend(_paired(attribute.g, node.attributes[attribute.name].as_graph(), depth + 1))
            for proto_body, body in zip(attribute.graphs, node.attributes[attribute.name].as_graphs() if
                                        attribute.graphs else (), strict=True):
                found.extend(_paired(proto_body, body, depth + 1))
    return found


def remove_dead_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove weight-chain nodes (Constant, Transpose, Cast, Identity, DequantizeLinear) whose outputs
    nobody reads any more, then initializers nobody reads, then stale ``value_info`` entries, in the main
    graph and in every body (uses inside bodies count: a weight read in a body stays).

    ``model`` is changed in place and returned.
    """
    linked = ir.serde.deserialize_graph(model.graph)
    pairs = _paired(model.graph, linked)
    RemoveDeadWeightsPass()(ir.Model(linked, ir_version=model.ir_version))
    # Innermost first: deleting a node of an outer graph must not move a body still to be edited.
    for proto, graph, nodes, _ in sorted(pairs, key=lambda pair: -pair[3]):
        kept = {id(node) for node in graph}
        for position in reversed(range(len(nodes))):
            if id(nodes[position]) not in kept:
                del proto.node[position]
        for position in reversed(range(len(proto.initializer))):
            if proto.initializer[position].name not in graph.initializers:
                del proto.initializer[position]
        alive = {value.name for value in graph.inputs} | set(graph.initializers)
        alive.update(value.name for node in graph for value in node.outputs if value.name)
        for position in reversed(range(len(proto.value_info))):
            if proto.value_info[position].name not in alive:
                del proto.value_info[position]
    return model
