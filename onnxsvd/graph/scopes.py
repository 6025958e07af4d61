"""Scopes: the If/Loop/Scan bodies of a model, the sites inside them, and sharing across scopes.

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
- :func:`body_sites` matches every MatMul/Gemm of every body as a site (with its ``scope``) or a skip.
- :func:`drop_shared_with_dense` keeps out sites whose stored weight is also read, in any scope, by a node
  that stays dense.

The emitter (:mod:`onnxsvd.graph.emit`) writes a body site's chain in its own body and the factors where
the weight is stored (visible to every use, since every use traced back to it); the cleanup pass
(:mod:`onnxsvd.graph.cleanup`) sweeps bodies too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir

from onnxsvd.config import RewriteConfig

if TYPE_CHECKING:
    from onnxsvd.graph.match import GraphIndex, Site, Skip

__all__ = ["Scope", "ModelScopes", "body_graphs", "body_sites", "drop_shared_with_dense"]


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
        from onnxsvd.graph import match  # match builds on this module's scopes lazily: no import cycle at load

        found = match.trace_constant(name, self.constant_tensor, self.producer_node)
        if found is None:
            return None
        chain_nodes = [self.node_at(key) for key in found[2]]
        if match._chain_shape(found[1], chain_nodes, self.constant_tensor) is None:
            return None
        return found


class ModelScopes:
    """Every body of a model, the key of every node, and who reads each name in any scope.

    Args:
        index: the main graph's index (the outermost scope).
    """

    def __init__(self, index: GraphIndex) -> None:
        graph = index.graph
        self.index = index
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.bodies: list[Scope] = []
        self.scope_of_key: dict[int, Scope] = {}
        #: per name, the graphs (main and bodies) that list it as an output
        self.outputs = {value.name for value in graph.output}
        self._graph_of_key: list[onnx.GraphProto] = [graph] * len(graph.node)
        self._position_of_key: list[int] = list(range(len(graph.node)))
        from onnxsvd.graph.match import node_name  # see Scope.trace

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

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> ModelScopes:
        """The scopes of ``graph`` (through a fresh :class:`GraphIndex`)."""
        from onnxsvd.graph.match import GraphIndex  # see Scope.trace

        return GraphIndex(graph).scopes

    def scope_of(self, key: int) -> Scope | None:
        """The body holding the node with ``key``, or None for a main-graph node."""
        return self.scope_of_key.get(key)

    def graph_of(self, key: int) -> tuple[onnx.GraphProto, int]:
        """The graph holding the node with ``key`` and the node's position in its ``graph.node``."""
        return self._graph_of_key[key], self._position_of_key[key]

    def display_name(self, key: int) -> str:
        """The node's name with its scope's path (``If_0/then_branch/MatMul_0``)."""
        from onnxsvd.graph.match import node_name  # see Scope.trace

        scope = self.scope_of(key)
        graph, position = self.graph_of(key)
        name = node_name(graph.node[position], position)
        return name if scope is None else f"{scope.name}/{name}"

    def outermost_holder(self, key: int) -> int:
        """Position in the main graph of the node itself, or of the outermost node holding its body."""
        scope = self.scope_of(key)
        return key if scope is None else scope.holder

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


def body_sites(index: GraphIndex, config: RewriteConfig) -> tuple[list[Site], list[Skip]]:
    """Every MatMul/Gemm inside a body, at any depth: a :class:`Site` with its ``scope`` (its weight an
    initializer or ``Constant`` of the body or of an outer scope, through the usual chains), or a skip with
    the reason. A node with no constant operand at all (attention's ``Q·Kᵀ``) is no skip: it holds no weight.
    ``config`` applies ``--include``/``--exclude``/``--min-params`` to the scoped names."""
    from onnxsvd.graph import match  # see Scope.trace

    sites: list[Site] = []
    skips: list[Skip] = []
    for scope in index.scopes.bodies:
        for number, node in enumerate(scope.graph.node):
            if node.op_type not in match.SITE_OPS:
                continue
            key = scope.keys[number]
            name = f"{scope.name}/{match.node_name(node, number)}"
            result = match._match_node(scope, node, key)  # type: ignore[arg-type]
            if isinstance(result, match.Skip):
                weights = {}
                for operand in node.input[:2]:
                    traced = scope.trace(operand) if operand else None
                    if traced is not None:
                        weights.setdefault(traced[0], traced[1])
                if not weights:
                    continue
                skips.append(dataclasses.replace(
                    match._holder_skip(name, node, scope.holder, weights, "", "subgraph", scope.where),
                    reason=f"inside {scope.where}: {result.reason}",
                ))
                continue
            site = dataclasses.replace(result, name=name, scope=scope.name, holder_index=scope.holder)
            reason = match._filter_reason(site, config)
            if reason:
                skips.append(_site_skip(site, scope, reason))
            else:
                sites.append(site)
    return sites, skips


def _site_skip(site: Site, scope: Scope | None, reason: str) -> Skip:
    from onnxsvd.graph.match import Skip  # see Scope.trace

    if scope is None:
        return Skip(site.name, site.op_type, site.node_index, reason, site.shape, site.dense_bytes)
    return Skip(site.name, site.op_type, scope.holder, reason, site.shape, site.dense_bytes, "subgraph",
                scope.where, site.params, (site.weight.tensor,))


def drop_shared_with_dense(index: GraphIndex, sites: Iterable[Site]) -> tuple[list[Site], list[Skip]]:
    """Sites whose stored weight (or a chain output) is also read, in any scope, by a node that stays, or is
    a graph's output: skipped, since factorizing them would add the factors while the dense copy stays.

    Uses that are sites in other scopes (a main-graph MatMul and a MatMul inside an If reading one weight)
    are no obstacle: they share one factorization.
    """
    scopes = index.scopes
    sites = list(sites)
    rewritten = {site.node_index for site in sites} | {key for site in sites for key in site.weight.chain}
    kept: list[Site] = []
    skips: list[Skip] = []
    for site in sites:
        tensors = [site.weight.tensor] + [scopes.nodes[key].output[0] for key in site.weight.chain]
        blocker = ""
        for tensor in tensors:
            if tensor in scopes.outputs:
                blocker = f"weight {tensor!r} is also a graph output"
                break
            reader = next((key for key in scopes.readers.get(tensor, []) if key not in rewritten), None)
            if reader is not None:
                blocker = (
                    f"weight {site.weight.tensor!r} is also read by {_describe(scopes, reader)}, "
                    "which keeps the dense copy"
                )
                break
        if blocker:
            skips.append(_site_skip(site, scopes.scope_of(site.node_index), blocker))
        else:
            kept.append(site)
    if len(kept) != len(sites):
        # Dropping a site can strand a weight its group-mates share: repeat until stable.
        again, more = drop_shared_with_dense(index, kept)
        return again, skips + more
    return kept, skips


def _describe(scopes: ModelScopes, key: int) -> str:
    """``Neg node 'x'``, or for a node inside a body ``Neg node 'If_0/then_branch/n' inside If node 'If_0'``."""
    from onnxsvd.graph.match import node_name  # see Scope.trace

    node = scopes.nodes[key]
    text = f"{node.op_type} node {scopes.display_name(key)!r}"
    scope = scopes.scope_of(key)
    if scope is not None:
        holder = scopes.nodes[scope.holder]
        text += f" inside {holder.op_type} node {node_name(holder, scope.holder)!r}"
    return text
