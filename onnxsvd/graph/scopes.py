"""Scopes: the If/Loop/Scan bodies of a model, one key per node across them, and who reads what in any scope.

A *scope* is one graph: the main graph, or a body held by a node's graph attribute (``then_branch`` and
``else_branch`` of If, ``body`` of Loop and Scan), at any depth. A body reads names of the scopes around it
(ONNX's lexical scoping); a body input shadows nothing, since names are in single static assignment across
scopes. Every node of the model gets one *key*: the main graph's nodes keep their positions in
``graph.node``, and bodies' nodes are numbered after them, depth first, in the order of the holders'
attributes. Keys are what a :class:`~onnxsvd.graph.match.Site` and its weight chain record, so a site
inside a body, and a chain that starts in an outer scope and ends in a body, are addressed like any other.

- :class:`ModelScopes` numbers the nodes, names each body (``If_0/then_branch``, ``loop/body/gate/then_branch``)
  and knows, per name, every node that reads it in any scope (onnx-ir's use-def links resolve a body's
  outer reads to the outer value).
- :class:`Scope` resolves constants and producers inside one body, falling back to the scopes around it,
  so :func:`~onnxsvd.graph.match.trace_constant` follows a weight from a body back into the main graph.

:mod:`onnxsvd.graph.match` builds on these: it matches every MatMul/Gemm of every body as a site (with its
``scope``) or a skip, and keeps out sites whose stored weight is also read, in any scope, by a node that
stays dense.

The emitter (:mod:`onnxsvd.graph.emit`) writes a body site's chain in its own body and the factors where
the weight is stored (visible to every use, since every use traced back to it); the cleanup pass
(:mod:`onnxsvd.graph.cleanup`) sweeps bodies too.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import onnx
import onnx_ir as ir

__all__ = ["Scope", "ModelScopes", "Tracer", "body_graphs", "node_name"]

#: Follows a name back through weight-chain ops to a stored constant as ``scope`` sees it:
#: ``tracer(scope, name) → (stored name, tensor, chain keys)`` or None (``onnxsvd.graph.match`` gives it).
Tracer = Callable[["Scope", str], "tuple[str, onnx.TensorProto, tuple[int, ...]] | None"]


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a deterministic one (``MatMul_12``) when the exporter left it empty."""
    return node.name or f"{node.op_type}_{index}"


def body_graphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """``(label, body)`` of each subgraph held by ``node``, in attribute order; the label is the attribute's
    name, with ``[i]`` for a list of graphs."""
    bodies = []
    for attribute in node.attribute:
        if attribute.HasField("g"):
            bodies.append((attribute.name, attribute.g))
        bodies.extend((f"{attribute.name}[{i}]", graph) for i, graph in enumerate(attribute.graphs))
    return bodies


class Scope:
    """One If/Loop/Scan body: its constants and producers, falling back to the scopes around it.

    Attributes:
        graph: the body.
        name: its path, ``<holder>/<attribute>`` (``If_0/then_branch``; nested: ``loop/body/gate/then_branch``).
        where: the same in words, for reasons (``"then_branch of If 'If_0'"``).
        outer: the scope around it (the main graph's :class:`GraphIndex`, or another body).
        holder: position in the main graph's ``graph.node`` of the outermost node holding it.
        keys: the key of each node of ``graph.node``.
        depth: 1 for a body of a main-graph node, 2 for a body inside it, …
    """

    def __init__(
        self, model_scopes: ModelScopes, graph: onnx.GraphProto, name: str, where: str, outer: Any, holder: int,
        depth: int,
    ) -> None:
        self.model_scopes = model_scopes
        self.graph = graph
        self.name = name
        self.where = where
        self.outer = outer
        self.holder = holder
        self.depth = depth
        self.keys: list[int] = []
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.inputs = {value.name for value in graph.input}
        self.producers: dict[str, int] = {}

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        """The stored tensor behind ``name`` as this body sees it (its own first, then the outer scopes')."""
        if name in self.inputs:
            return None  # a body input is a value of the iteration, never a constant
        if name in self.initializers:
            return self.initializers[name]
        key = self.producers.get(name)
        if key is not None:
            node = self.node_at(key)
            if node.op_type == "Constant":
                return next((a.t for a in node.attribute if a.name == "value"), None)
            return None
        return self.outer.constant_tensor(name)

    def producer_node(self, name: str) -> tuple[int, onnx.NodeProto] | None:
        """``(key, node)`` of the node writing ``name`` in this body or an outer scope, or None."""
        if name in self.inputs or name in self.initializers:
            return None
        key = self.producers.get(name)
        if key is not None:
            return key, self.node_at(key)
        return self.outer.producer_node(name)

    def node_at(self, key: int) -> onnx.NodeProto:
        """The node with ``key``, in any scope."""
        return self.model_scopes.nodes[key]

    def trace(self, name: str) -> tuple[str, onnx.TensorProto, tuple[int, ...]] | None:
        """Follow ``name`` back through chain ops to a stored constant, in this body or around it."""
        return self.model_scopes.tracer(self, name)


class ModelScopes:
    """Every body of a model, the key of every node, and who reads each name in any scope.

    Args:
        index: the main graph's index (the outermost scope: ``graph``, ``constant_tensor``,
            ``producer_node``), an :class:`onnxsvd.graph.match.GraphIndex`.
        tracer: follows a name to its stored constant inside a body (see :data:`Tracer`).
    """

    def __init__(self, index: Any, tracer: Tracer) -> None:
        graph = index.graph
        self.index = index
        self.tracer = tracer
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.bodies: list[Scope] = []
        self.scope_of_key: dict[int, Scope] = {}
        #: per name, the graphs (main and bodies) that list it as an output
        self.outputs = {value.name for value in graph.output}
        self._graph_of_key: list[onnx.GraphProto] = [graph] * len(graph.node)
        self._position_of_key: list[int] = list(range(len(graph.node)))

        def visit(outer: Any, holder: onnx.NodeProto, path: str, position: int, depth: int) -> None:
            for label, body in body_graphs(holder):
                scope = Scope(self, body, f"{path}/{label}", f"{label} of {holder.op_type} {path!r}", outer,
                              position, depth)
                self.bodies.append(scope)
                self.outputs.update(value.name for value in body.output)
                for number, node in enumerate(body.node):
                    key = len(self.nodes)
                    self.nodes.append(node)
                    self._graph_of_key.append(body)
                    self._position_of_key.append(number)
                    scope.keys.append(key)
                    self.scope_of_key[key] = scope
                    scope.producers.update((name, key) for name in node.output if name)
                for number, node in enumerate(body.node):
                    visit(scope, node, f"{scope.name}/{node_name(node, number)}", position, depth + 1)

        for position, node in enumerate(graph.node):
            visit(index, node, node_name(node, position), position, 1)

    def scope_of(self, key: int) -> Scope | None:
        """The body holding the node with ``key``, or None for a main-graph node."""
        return self.scope_of_key.get(key)

    def graph_of(self, key: int) -> tuple[onnx.GraphProto, int]:
        """The graph holding the node with ``key`` and the node's position in its ``graph.node``."""
        return self._graph_of_key[key], self._position_of_key[key]

    def display_name(self, key: int) -> str:
        """The node's name with its scope's path (``If_0/then_branch/MatMul_0``)."""

        scope = self.scope_of(key)
        graph, position = self.graph_of(key)
        name = node_name(graph.node[position], position)
        return name if scope is None else f"{scope.name}/{name}"

    def outermost_holder(self, key: int) -> int:
        """Position in the main graph of the node itself, or of the outermost node holding its body."""
        scope = self.scope_of(key)
        return key if scope is None else scope.holder

    def describe(self, key: int) -> str:
        """``Neg node 'x'``; for a node inside a body ``Neg node 'If_0/then_branch/n' inside If node 'If_0'``."""
        node = self.nodes[key]
        text = f"{node.op_type} node {self.display_name(key)!r}"
        scope = self.scope_of(key)
        if scope is not None:
            holder = self.nodes[scope.holder]
            text += f" inside {holder.op_type} node {node_name(holder, scope.holder)!r}"
        return text

    @functools.cached_property
    def readers(self) -> dict[str, list[int]]:
        """Per name, the keys of every node reading it, in any scope (a body's read of an outer name is the
        body node's, not its holder's)."""
        linked = ir.serde.deserialize_graph(self.index.graph)
        key_of: dict[int, int] = {}
        for _, linked_graph, keys in self._pairs(self.index.graph, linked):
            for node, key in zip(linked_graph, keys, strict=True):
                key_of[id(node)] = key
        found: dict[str, list[int]] = defaultdict(list)
        for value in _all_values(linked):
            if value.name:
                found[value.name] = sorted({key_of[id(use.node)] for use in value.uses()})
        return dict(found)

    def _pairs(
        self, graph: onnx.GraphProto, linked: ir.Graph
    ) -> Iterator[tuple[onnx.GraphProto, ir.Graph, list[int]]]:
        """Each protobuf graph with its onnx-ir graph and the keys of its nodes, main graph first, then the
        bodies in key order."""
        yield graph, linked, list(range(len(graph.node)))
        bodies = iter(self.bodies)

        def visit(proto_node: onnx.NodeProto, linked_node: ir.Node) -> Iterator[tuple[Any, ...]]:
            for label, _ in body_graphs(proto_node):
                scope = next(bodies)
                linked_body = _linked_body(linked_node, label)
                yield scope.graph, linked_body, scope.keys
                for inner_proto, inner_linked in zip(scope.graph.node, linked_body, strict=True):
                    yield from visit(inner_proto, inner_linked)

        for proto_node, linked_node in zip(graph.node, linked, strict=True):
            yield from visit(proto_node, linked_node)


def _linked_body(node: ir.Node, label: str) -> ir.Graph:
    """The onnx-ir body of ``node`` for the label :func:`body_graphs` gave it."""
    if label.endswith("]"):
        name, number = label[:-1].split("[")
        return node.attributes[name].as_graphs()[int(number)]
    return node.attributes[label].as_graph()


def _all_values(graph: ir.Graph) -> Iterable[ir.Value]:
    """Inputs, initializers and node outputs of ``graph`` and of every body in it."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs
        for attribute in node.attributes.values():
            bodies = []
            if attribute.type == ir.AttributeType.GRAPH:
                bodies = [attribute.as_graph()]
            elif attribute.type == ir.AttributeType.GRAPHS:
                bodies = list(attribute.as_graphs())
            for body in bodies:
                yield from _all_values(body)
