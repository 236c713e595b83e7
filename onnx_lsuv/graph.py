"""Facts about a graph's data flow, built once: producers, consumers (including the names that
If/Loop/Scan bodies read from the enclosing graph), constants, ancestry, and the edits that keep
a rewritten graph valid (rewiring a name everywhere it is read, a topological order).

"Upstream" always means data flow here, never a position in the node list.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from .model_io import tensor_array

# Input position of a name that a node does not take explicitly but that one of its subgraph
# bodies reads from the enclosing scope.
OUTER_SCOPE = -1
SUBGRAPH_OPS = ("If", "Loop", "Scan")


# Where a graph sits inside the main graph: per level, (node index in the enclosing graph,
# name of the node's graph attribute), outermost first; () is the main graph itself.
Scope = tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class ConstRef:
    """A constant tensor of the graph: an initializer, or the ``value`` of a Constant node; of
    the main graph, or of an If branch (``scope``) whose layers are targets."""

    name: str  # the initializer's name, or the Constant node's output name
    constant_node: int | None = None  # index in graph.node when the tensor is a Constant's value
    scope: Scope = ()  # the graph holding it (see ``Scope``)

    @property
    def scoped_name(self) -> str:
        """The name with its scope, for one in an If branch ("<name>@<If>.<branch>/..."):
        two branches may each hold a tensor of one name."""
        if not self.scope:
            return self.name
        return f"{self.name}@{'/'.join(f'{i}.{attr}' for i, attr in self.scope)}"


def node_label(node: onnx.NodeProto, i: int) -> str:
    """How messages name node ``i`` of its graph: its name, or its op type and index."""
    return node.name or f"{node.op_type}_{i}"


def scope_graph(graph: onnx.GraphProto, scope: Scope) -> onnx.GraphProto:
    """The graph at ``scope`` inside ``graph`` (the main graph)."""
    for i, attr in scope:
        graph = next(a.g for a in graph.node[i].attribute if a.name == attr)
    return graph


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of an If/Loop/Scan (or any node with graph attributes)."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names that ``node``'s subgraph bodies read from the enclosing scope (recursively)."""
    reads: set[str] = set()
    for g in subgraphs(node):
        defined = ({i.name for i in g.input} | {t.name for t in g.initializer}
                   | {o for n in g.node for o in n.output})
        for n in g.node:
            reads.update(name for name in n.input if name and name not in defined)
            reads.update(outer_reads(n) - defined)
        reads.update(o.name for o in g.output if o.name not in defined)
    return reads


def rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node`` read ``new`` wherever it reads ``old``: its inputs and, where no body
    defines ``old`` itself, inside its subgraph bodies."""
    for k, name in enumerate(node.input):
        if name == old:
            node.input[k] = new
    for g in subgraphs(node):
        defined = ({i.name for i in g.input} | {t.name for t in g.initializer}
                   | {o for n in g.node for o in n.output})
        if old in defined:
            continue
        for n in g.node:
            rename_input(n, old, new)
        for o in g.output:
            if o.name == old:  # a body that returns the outer value itself (outputs are
                o.name = new   # positional, so the name can change)


class GraphIndex:
    """Producers, consumers and constants of a graph, built once.

    ``consumers[name]`` lists (node, input position) for every node that reads ``name``; a read
    by a subgraph body of node i is listed as (i, OUTER_SCOPE).
    """

    # The graph's place in the main graph, and which branch of each If the data takes
    # (``layers.Branches``; None: no data decides, every branch counts).
    scope: Scope = ()
    branches: dict | None = None

    def __init__(self, graph: onnx.GraphProto, opset: int = 0) -> None:
        self.graph = graph
        self.opset = opset
        self.initializers = {t.name: t for t in graph.initializer}
        # the model's local functions by (domain, name): set by layers.find_layers
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.reads: list[set[str]] = []  # per node: every name it reads, outer scope included
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for pos, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, pos))
            reads = {n for n in node.input if n}
            # A body's read is listed even when the node also takes the name explicitly: a
            # rewrite that rewires the input must rename it in the body too.
            for name in sorted(outer_reads(node)) if node.attribute else ():
                self.consumers[name].append((i, OUTER_SCOPE))
                reads.add(name)
            self.reads.append(reads)
        self.graph_outputs = {o.name for o in graph.output}

    def node_name(self, i: int) -> str:
        return node_label(self.graph.node[i], i)

    def through_identity(self, name: str) -> str:
        """The tensor that ``name`` is, up the chain of Identity nodes that produce it."""
        seen = set()
        while name and name not in seen:
            seen.add(name)
            i = self.producer.get(name)
            if i is None:
                break
            node = self.graph.node[i]
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                break
            name = node.input[0]
        return name

    def resolve_const(self, name: str) -> ConstRef | None:
        """Follow Identity nodes back from ``name``; the constant found there, if any."""
        name = self.through_identity(name)
        if name in self.initializers:
            return ConstRef(name, scope=self.scope)
        i = self.producer.get(name)
        if i is not None and self.graph.node[i].op_type == "Constant" and any(
                a.name == "value" for a in self.graph.node[i].attribute):
            return ConstRef(name, constant_node=i, scope=self.scope)
        return None

    def tensor_proto(self, ref: ConstRef) -> onnx.TensorProto:
        """The tensor ``ref`` names: in this graph, or (from the main graph's index) in the
        If branch of its scope."""
        graph = self.graph if ref.scope == self.scope else scope_graph(self.graph, ref.scope)
        if ref.constant_node is None:
            if graph is self.graph:
                return self.initializers[ref.name]
            return next(t for t in graph.initializer if t.name == ref.name)
        node = graph.node[ref.constant_node]
        return next(a.t for a in node.attribute if a.name == "value")

    def const_array(self, ref: ConstRef) -> np.ndarray:
        return tensor_array(self.tensor_proto(ref))

    # Weights and biases: in the main graph, its own constants. (``BodyIndex`` maps a body's
    # names onto the main graph's constants.)
    def resolve_weight(self, name: str) -> ConstRef | None:
        return self.resolve_const(name)

    def weight_proto(self, ref: ConstRef) -> onnx.TensorProto:
        return self.tensor_proto(ref)

    def readers_through(self, name: str, through: set[int]) -> tuple[set[tuple[int, int]], bool]:
        """Every (node, input position) that reads ``name`` or a value computed from it by the
        nodes ``through`` (a layer's chains of layout ops) or by Identity nodes, except those
        nodes themselves; and whether such a value is a graph output."""
        readers: set[tuple[int, int]] = set()
        returned = False
        stack, seen = [name], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            returned |= n in self.graph_outputs
            for i, pos in self.consumers.get(n, []):
                node = self.graph.node[i]
                if i in through or (node.op_type == "Identity" and node.domain in ("", "ai.onnx")
                                    and pos != OUTER_SCOPE):
                    stack.extend(o for o in node.output if o)
                else:
                    readers.add((i, pos))
        return readers, returned

    def downstream(self, names: set[str], blocked: set[int]) -> set[str]:
        """``names`` and every tensor computed from them (explicitly or through a body) by
        nodes not in ``blocked``."""
        seen = set(names)
        stack = list(names)
        while stack:
            for i, _ in self.consumers.get(stack.pop(), []):
                if i in blocked:
                    continue
                for out in self.graph.node[i].output:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
        return seen

    def const_is_graph_output(self, ref: ConstRef) -> bool:
        return ref.name in self.graph_outputs

    def ancestors(self, i: int) -> set[int]:
        """The nodes whose outputs node ``i`` depends on (explicitly or through a body)."""
        seen: set[int] = set()
        stack = [i]
        while stack:
            for name in self.reads[stack.pop()]:
                j = self.producer.get(name)
                if j is not None and j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen


class BodyIndex(GraphIndex):
    """The body of a Loop or Scan of the main graph, whose weights are the main graph's
    constants: read from the enclosing scope, or passed in as loop-carried (Scan: state)
    values that the body returns unchanged (tf2onnx and jax2onnx do the latter).

    ``resolve_weight`` maps such a body name to the main graph's ``ConstRef``; body-local
    constants (a Slice's starts) stay body constants of ``resolve_const``.
    """

    def __init__(self, body: onnx.GraphProto, opset: int, main: GraphIndex, node: int) -> None:
        super().__init__(body, opset)
        self.main = main
        self.node_index = node
        loop = main.graph.node[node]
        self.carried: dict[str, str] = {}  # body input name -> main graph name
        self.returned: dict[str, str] = {}  # the same, returned by the Loop to a reader
        for pos, out in state_pairs(loop, body):
            if pos >= len(loop.input) or out >= len(body.output) or not loop.input[pos]:
                continue
            name = body.input[pos].name
            returned = self.through_identity(body.output[out].name)
            final = loop.output[out - 1 if loop.op_type == "Loop" else out] \
                if (out - 1 if loop.op_type == "Loop" else out) < len(loop.output) else ""
            if final and (main.consumers.get(final) or final in main.graph_outputs):
                self.returned[name] = final  # the Loop returns it to a reader: not a weight
                continue
            if returned == name:  # passed through unchanged: the same value every iteration
                self.carried[name] = loop.input[pos]
        self.defined = ({i.name for i in body.input} | {t.name for t in body.initializer}
                        | set(self.producer))

    def resolve_weight(self, name: str) -> ConstRef | None:
        name = self.through_identity(name)
        if name in self.carried:
            return self.main.resolve_const(self.carried[name])
        if name and name not in self.defined:  # read from the enclosing (main) graph
            return self.main.resolve_const(name)
        return None

    def weight_proto(self, ref: ConstRef) -> onnx.TensorProto:
        return self.main.tensor_proto(ref)


class BranchIndex(GraphIndex):
    """A branch (then_branch or else_branch) of an If, in the main graph or in another
    branch: its own constants (initializers, Constant nodes) are ``ConstRef``s of its scope;
    a name it does not define is the enclosing graph's, resolved there."""

    def __init__(self, branch: onnx.GraphProto, outer: GraphIndex, node: int,
                 attr: str) -> None:
        super().__init__(branch, outer.opset)
        self.outer = outer
        self.node_index = node
        self.attr = attr
        self.scope = (*outer.scope, (node, attr))
        self.branches = outer.branches
        self.functions = outer.functions
        self.defined = ({i.name for i in branch.input} | set(self.initializers)
                        | set(self.producer))

    def resolve_const(self, name: str) -> ConstRef | None:
        name = self.through_identity(name)
        if name and name not in self.defined:  # read from the enclosing scope
            return self.outer.resolve_const(name)
        return super().resolve_const(name)

    def tensor_proto(self, ref: ConstRef) -> onnx.TensorProto:
        if ref.scope != self.scope:  # an enclosing graph's
            return self.outer.tensor_proto(ref)
        return super().tensor_proto(ref)


def scope_index(index: GraphIndex, scope: Scope) -> GraphIndex:
    """The index of the If branch at ``scope`` (inside ``index``'s graph), or ``index``."""
    for i, attr in scope[len(index.scope):]:
        branch = next(a.g for a in index.graph.node[i].attribute if a.name == attr)
        index = BranchIndex(branch, index, i, attr)
    return index


def if_nodes(graph: onnx.GraphProto, scope: Scope = ()) -> list[tuple[Scope, int]]:
    """Every If node of ``graph`` and, recursively, of its If branches, as (the scope of the
    graph holding it, its index there), outer ones first. Not those inside Loop/Scan bodies,
    whose branch may change from one iteration to the next."""
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        found.append((scope, i))
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found.extend(if_nodes(a.g, (*scope, (i, a.name))))
    return found


def state_pairs(loop: onnx.NodeProto, body: onnx.GraphProto) -> list[tuple[int, int]]:
    """(body input position, body output position) of each value a Loop or Scan carries from
    one iteration to the next: a Loop's body inputs after the iteration number and the
    condition, returned after the condition; a Scan's first inputs and outputs (its state
    variables), before the scanned ones."""
    if loop.op_type == "Loop":
        return [(2 + k, 1 + k) for k in range(len(body.input) - 2)]
    n_scan = int(attribute(loop, "num_scan_inputs", 0))
    return [(k, k) for k in range(len(body.input) - n_scan)]


def reached_by_data(model: onnx.ModelProto) -> set[str]:
    """Tensors that depend on at least one graph input that is not an initializer, following
    the names that subgraph bodies read from the enclosing scope too."""
    inits = {t.name for t in model.graph.initializer}
    reached = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:  # topological order
        reads = set(node.input) | (outer_reads(node) if node.attribute else set())
        if reads & reached:
            reached.update(o for o in node.output if o)
    return reached


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically, keeping the given order wherever it is valid
    (a rewrite may make an early node read a value computed later)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        reads = {x for x in n.input if x} | (outer_reads(n) if n.attribute else set())
        d = {producer[x] for x in reads if x in producer and producer[x] != i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    if all(j < i for i, d in enumerate(deps) for j in d):
        return
    missing = [len(d) for d in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("the rewritten graph has a cycle")
    ordered = []
    for i in order:
        copy = onnx.NodeProto()
        copy.CopyFrom(nodes[i])
        ordered.append(copy)
    del graph.node[:]
    graph.node.extend(ordered)


# Ops whose outputs do not scale with their inputs (indices, shapes): a weight's scale does
# not reach a use whose input depends on another use's output only through them, and no
# recurrent state travels through them (a greedy decoder's ArgMax picks the next token).
INDEX_OPS = frozenset({"ArgMax", "ArgMin", "Shape", "Size", "NonZero"})


def attribute(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
