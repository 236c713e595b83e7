"""Target discovery: which nodes are LSUV layers, where their weights and biases live.

A target is a Conv, ConvTranspose, Gemm, or MatMul whose weight operand is a constant: an
initializer or a Constant node, reached directly or through a chain of Identity nodes (PyTorch's
exporter routes deduplicated initializers that way). A MatMul followed by an Add of a constant
vector (PyTorch's Linear on 3-D input) is one layer whose bias is that vector and whose output is
the Add's output. Layers come in the graph's node order, which ONNX requires to be topological.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .layouts import GATES, RNN_OPS, TARGET_OPS, WeightLayout

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
SUBGRAPH_OPS = ("If", "Loop", "Scan")
# Attention exported as one node (com.microsoft and opset 23): its weights are not handled.
FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "PackedAttention",
                       "PackedMultiHeadAttention", "GroupQueryAttention", "DecoderAttention",
                       "DecoderMaskedMultiHeadAttention", "QAttention")


@dataclass(frozen=True)
class ConstRef:
    """A constant tensor of the graph: an initializer, or the ``value`` of a Constant node."""

    name: str  # the initializer's name, or the Constant node's output name
    constant_node: int | None = None  # index in graph.node when the tensor is a Constant's value


@dataclass
class Layer:
    """One LSUV target layer.

    Attributes:
        index: Position among the targets (topological).
        name: The node's name (or ``op_<node index>`` when it has none).
        op: ONNX op type.
        node_index: Index of the node in ``graph.node``.
        weight: Where the weight lives.
        layout: Matrix view of the weight.
        dtype: The weight's numpy dtype.
        bias: Where the bias lives, if the layer has a constant one.
        bias_input: (node index, input position) through which the layer reads its bias.
        bias_scale: Factor the op applies to the bias (Gemm's ``beta``; 1 otherwise).
        output: The tensor whose variance LSUV sets (after the bias).
        output_rank: Rank of ``output`` when known from the weight (Conv: weight rank; Gemm: 2).
        shared_weight_users: Other consumers of the weight tensor (node names), if any.
        weight_read_upstream: Whether a node before this one reads the weight too, so that
            rescaling it also changes the layer's own input.
        blocks: The parts of the output that get a variance and a factor each, in the order of
            the output units: ("",) for one; ("q", "k", "v") for a fused projection that a
            Split cuts; the gates ("i", "o", "f", "c", per direction) of a recurrent op, whose
            parts are the input projections W_g x. One matrix group per block.
        recurrent: For LSTM/GRU/RNN, the recurrent weight R.
        recurrent_layout: Its matrix view, one matrix per direction and gate.
    """

    index: int
    name: str
    op: str
    node_index: int
    weight: ConstRef
    layout: WeightLayout
    dtype: np.dtype
    bias: ConstRef | None
    bias_input: tuple[int, int] | None
    bias_scale: float
    output: str
    output_rank: int | None
    shared_weight_users: list[str] = field(default_factory=list)
    weight_read_upstream: bool = False  # a node before this one reads the same weight
    weight_transpose: int | None = None  # MatMul: the Transpose node its weight comes through
    blocks: tuple[str, ...] = ("",)  # names of the separately scaled parts of the output
    recurrent: ConstRef | None = None  # LSTM/GRU/RNN: R, orthonormal per gate, not scaled
    recurrent_layout: WeightLayout | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def is_recurrent(self) -> bool:
        return self.op in RNN_OPS

    def block_name(self, b: int) -> str:
        return self.name if self.blocks == ("",) else f"{self.name}[{self.blocks[b]}]"

    @property
    def channel_axis(self) -> int:
        """The output's axis of output units: 1 for convolutions, the last one otherwise."""
        return 1 if self.op in ("Conv", "ConvTranspose") else -1

    @property
    def bias_add_node(self) -> int | None:
        """Index of the separate bias Add node (MatMul + Add), if any."""
        if self.bias_input is not None and self.bias_input[0] != self.node_index:
            return self.bias_input[0]
        return None


@dataclass
class Skipped:
    """A candidate that is not a target, and why."""

    name: str
    op: str
    reason: str


@dataclass
class Discovery:
    layers: list[Layer]
    skipped: list[Skipped]


class GraphIndex:
    """Producers, consumers and constants of a graph, built once."""

    def __init__(self, graph: onnx.GraphProto, opset: int = 0) -> None:
        self.graph = graph
        self.opset = opset
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for pos, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, pos))
        self.graph_outputs = {o.name for o in graph.output}

    def node_name(self, i: int) -> str:
        node = self.graph.node[i]
        return node.name or f"{node.op_type}_{i}"

    def resolve_const(self, name: str) -> ConstRef | None:
        """Follow Identity nodes back from ``name``; the constant found there, if any."""
        seen = set()
        while name and name not in seen:
            seen.add(name)
            if name in self.initializers:
                return ConstRef(name)
            i = self.producer.get(name)
            if i is None:
                return None
            node = self.graph.node[i]
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                name = node.input[0]
                continue
            if node.op_type == "Constant" and any(a.name == "value" for a in node.attribute):
                return ConstRef(name, constant_node=i)
            return None
        return None

    def tensor_proto(self, ref: ConstRef) -> onnx.TensorProto:
        if ref.constant_node is None:
            return self.initializers[ref.name]
        node = self.graph.node[ref.constant_node]
        return next(a.t for a in node.attribute if a.name == "value")

    def const_array(self, ref: ConstRef) -> np.ndarray:
        return numpy_helper.to_array(self.tensor_proto(ref))

    def users_of_const(self, ref: ConstRef) -> list[tuple[int, int]]:
        """Every (node, input position) that reads ``ref``, through Identity chains too."""
        users: list[tuple[int, int]] = []
        stack = [ref.name]
        seen = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for i, pos in self.consumers.get(name, []):
                node = self.graph.node[i]
                if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                    stack.extend(o for o in node.output if o)
                else:
                    users.append((i, pos))
        return users

    def const_is_graph_output(self, ref: ConstRef) -> bool:
        return ref.name in self.graph_outputs


def attribute(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default`` when it is absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _why_not_const(index: GraphIndex, name: str) -> str | None:
    """A reason when a non-constant weight is a quantized or cast constant."""
    i = index.producer.get(name)
    if i is None:
        return None
    node = index.graph.node[i]
    if node.op_type in ("DequantizeLinear", "Cast") and index.resolve_const(node.input[0]):
        return f"weight comes through {node.op_type} (quantized or cast weights are not changed)"
    return None


def _matmul_bias(index: GraphIndex, i: int, n_out: int) -> tuple[int, int, ConstRef] | None:
    """The Add after MatMul node ``i`` that adds a constant vector of length ``n_out``."""
    out = index.graph.node[i].output[0]
    users = index.consumers.get(out, [])
    if len(users) != 1 or out in index.graph_outputs:
        return None
    j, pos = users[0]
    add = index.graph.node[j]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = 1 - pos
    ref = index.resolve_const(add.input[other])
    if ref is None:
        return None
    shape = tuple(index.tensor_proto(ref).dims)
    if not shape or shape[-1] != n_out or int(np.prod(shape)) != n_out:
        return None
    return j, other, ref


def find_layers(model: onnx.ModelProto) -> Discovery:
    """Find the LSUV target layers of ``model``'s main graph, in topological order.

    Args:
        model: The model (its external data, if any, already loaded).

    Returns:
        The targets, and the candidates that were skipped with the reason.
    """
    graph = model.graph
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    index = GraphIndex(graph, opset)
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    weight_owner: dict[ConstRef, Layer] = {}
    reached = _reached_by_data(model)

    for i, node in enumerate(graph.node):
        name = index.node_name(i)
        if node.op_type in SUBGRAPH_OPS:
            inner = _count_subgraph_targets(node)
            if inner:
                skipped.append(
                    Skipped(name, node.op_type, f"{inner} target op(s) inside a subgraph")
                )
            continue
        if node.op_type in FUSED_ATTENTION_OPS:
            consts = [n for n in node.input if n and index.resolve_const(n) is not None]
            if consts:
                skipped.append(Skipped(name, node.op_type, "fused attention node: its weights "
                                       f"({', '.join(consts)}) are not changed"))
            continue
        if node.op_type in RNN_OPS and node.domain in ("", "ai.onnx"):
            found = _recurrent_layer(index, i, len(layers), reached)
            owner = None if isinstance(found, Skipped) else next(
                (weight_owner[r] for r in (found.weight, found.recurrent) if r in weight_owner),
                None)
            if isinstance(found, Skipped):
                skipped.append(found)
            elif owner is not None:  # one LSTM called twice: its weights are set once
                owner.shared_weight_users.append(name)
                skipped.append(Skipped(name, node.op_type,
                                       f"weights tied to layer {owner.name} (set at first use)"))
            else:
                weight_owner[found.weight] = weight_owner[found.recurrent] = found
                layers.append(found)
            continue
        if node.op_type not in TARGET_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 2:
            continue
        x_ref = index.resolve_const(node.input[0])
        w_ref = index.resolve_const(node.input[1])
        transpose = _transposed_const(index, node.input[1]) if node.op_type == "MatMul" else None
        if w_ref is None and transpose is not None:
            transpose, w_ref = transpose
        if w_ref is None:
            reason = _why_not_const(index, node.input[1])
            if reason or node.op_type != "MatMul":
                skipped.append(Skipped(name, node.op_type, reason or "weight is not a constant"))
            continue
        if x_ref is not None:
            skipped.append(Skipped(name, node.op_type, "both operands are constants"))
            continue
        if node.input[0] not in reached:
            skipped.append(Skipped(name, node.op_type,
                                   "not reached by the data: its input depends on no graph input"))
            continue
        tensor = index.tensor_proto(w_ref)
        if tensor.data_type not in FLOAT_TYPES:
            skipped.append(Skipped(name, node.op_type, "weight is not a floating-point tensor"))
            continue
        shape = tuple(int(d) for d in tensor.dims)
        groups = int(attribute(node, "group", 1)) if node.op_type.startswith("Conv") else 1
        trans = (bool(attribute(node, "transB", 0)) if node.op_type == "Gemm"
                 else transpose is not None)
        try:
            layout = WeightLayout(node.op_type, shape, groups, trans)
        except ValueError as err:
            skipped.append(Skipped(name, node.op_type, str(err)))
            continue
        if w_ref in weight_owner:
            owner = weight_owner[w_ref]
            owner.shared_weight_users.append(name)
            skipped.append(
                Skipped(name, node.op_type, f"weight tied to layer {owner.name} (set at first use)")
            )
            continue

        bias = None
        bias_input = None
        bias_scale = 1.0
        output = node.output[0]
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2:
            if node.input[2]:
                bias = index.resolve_const(node.input[2])
                if bias is None:
                    skipped.append(Skipped(name, node.op_type, "bias is not a constant"))
                    continue
                bias_input = (i, 2)
                if node.op_type == "Gemm":
                    bias_scale = float(attribute(node, "beta", 1.0))
        elif node.op_type == "MatMul":
            found = _matmul_bias(index, i, layout.output_units)
            if found is not None:
                j, pos, bias = found
                bias_input = (j, pos)
                output = graph.node[j].output[0]
        if node.op_type in ("Conv", "ConvTranspose"):
            rank = len(shape)
        elif node.op_type == "Gemm":
            rank = 2
        else:
            rank = None
        blocks = ("",)
        parts = _equal_split(index, output, rank) if node.op_type in ("Gemm", "MatMul") else 0
        if parts > 1:  # a fused projection (QKV): orthonormal and scaled per part
            try:
                layout = WeightLayout(node.op_type, shape, parts, trans)
                blocks = ("q", "k", "v") if parts == 3 else tuple(f"p{k}" for k in range(parts))
            except ValueError:
                pass
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        layer = Layer(
            index=len(layers),
            name=name,
            op=node.op_type,
            node_index=i,
            weight=w_ref,
            layout=layout,
            dtype=np.dtype(dtype),
            bias=bias,
            bias_input=bias_input,
            bias_scale=bias_scale,
            output=output,
            output_rank=rank,
            blocks=blocks,
            weight_transpose=transpose,
        )
        weight_owner[w_ref] = layer
        layers.append(layer)

    for layer in layers:
        own = {layer.node_index, layer.weight_transpose}
        users = [j for j, _ in index.users_of_const(layer.weight) if j not in own]
        layer.shared_weight_users.extend(
            index.node_name(j) for j in users
            if index.node_name(j) not in layer.shared_weight_users)
        layer.weight_read_upstream = any(j < layer.node_index for j in users)
    return Discovery(layers, skipped)


def _transposed_const(index: GraphIndex, name: str) -> tuple[int, ConstRef] | None:
    """(Transpose node, constant) when ``name`` is a 2-D constant read through a Transpose."""
    i = index.producer.get(name)
    if i is None:
        return None
    node = index.graph.node[i]
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    ref = index.resolve_const(node.input[0])
    if ref is None or len(index.tensor_proto(ref).dims) != 2:
        return None
    if list(attribute(node, "perm", [1, 0])) != [1, 0]:
        return None
    return i, ref


def _equal_split(index: GraphIndex, output: str, rank: int | None) -> int:
    """Parts of ``output`` when its only reader is a Split into equal parts on the last axis.

    A Split whose parts are all read, and only by Max nodes (maxout, pairwise or in one node),
    is part of the activation, not a fused projection: the layer stays whole, as the paper
    measures a maxout layer's output.
    """
    users = index.consumers.get(output, [])
    if len(users) != 1 or output in index.graph_outputs:
        return 0
    node = index.graph.node[users[0][0]]
    if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or users[0][1] != 0:
        return 0
    axis = int(attribute(node, "axis", 0))
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return 0
    sizes = attribute(node, "split", None)
    if sizes is None and len(node.input) > 1 and node.input[1]:
        ref = index.resolve_const(node.input[1])
        if ref is None:
            return 0
        sizes = index.const_array(ref).tolist()
    if sizes is not None and len(set(sizes)) != 1:
        return 0
    return 0 if _is_maxout(index, node) else len(node.output)


def _is_maxout(index: GraphIndex, split: onnx.NodeProto) -> bool:
    parts = [p for p in split.output if p]
    readers = [index.graph.node[i] for p in parts for i, _ in index.consumers.get(p, [])]
    return (len(parts) == len(split.output)
            and all(index.consumers.get(p) and p not in index.graph_outputs for p in parts)
            and all(r.op_type == "Max" and r.domain in ("", "ai.onnx") for r in readers))


def _recurrent_layer(index: GraphIndex, i: int, position: int,
                     reached: set[str]) -> Layer | Skipped | None:
    """The LSUV layer of an LSTM, GRU or RNN node: W scaled per gate, R orthonormal per gate."""
    node = index.graph.node[i]
    name = index.node_name(i)
    if len(node.input) < 3:
        return None
    if node.input[0] not in reached:
        return Skipped(name, node.op_type,
                       "not reached by the data: its input depends on no graph input")
    if len(node.input) > 4 and node.input[4] and index.opset < 11:
        return Skipped(name, node.op_type, "sequence_lens below opset 11 (no Range) is not handled")
    w_ref, r_ref = index.resolve_const(node.input[1]), index.resolve_const(node.input[2])
    if w_ref is None or r_ref is None:
        return Skipped(name, node.op_type, "W or R is not a constant")
    w, r = index.tensor_proto(w_ref), index.tensor_proto(r_ref)
    if w.data_type not in FLOAT_TYPES:
        return Skipped(name, node.op_type, "weight is not a floating-point tensor")
    gates = GATES[node.op_type]
    dirs = int(w.dims[0])
    try:
        layout = WeightLayout(node.op_type, tuple(w.dims), dirs * len(gates))
        r_layout = WeightLayout(node.op_type, tuple(r.dims), dirs * len(gates))
    except ValueError as err:
        return Skipped(name, node.op_type, str(err))
    prefixes = ("fw.", "bw.") if dirs == 2 else ("",)
    bias = index.resolve_const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    return Layer(
        index=position, name=name, op=node.op_type, node_index=i, weight=w_ref, layout=layout,
        dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(w.data_type)), bias=bias,
        bias_input=(i, 3) if bias is not None else None, bias_scale=1.0, output="",
        output_rank=None,
        blocks=tuple(p + g for p in prefixes for g in gates),
        recurrent=r_ref, recurrent_layout=r_layout,
    )


def _reached_by_data(model: onnx.ModelProto) -> set[str]:
    """Tensors that depend on at least one graph input that is not an initializer."""
    inits = {t.name for t in model.graph.initializer}
    reached = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:  # topological order
        if any(name in reached for name in node.input):
            reached.update(o for o in node.output if o)
    return reached


def _count_subgraph_targets(node: onnx.NodeProto) -> int:
    count = 0
    for a in node.attribute:
        graphs = list(a.graphs) + ([a.g] if a.type == onnx.AttributeProto.GRAPH else [])
        for g in graphs:
            for n in g.node:
                if n.op_type in TARGET_OPS:
                    count += 1
                elif n.op_type in SUBGRAPH_OPS:
                    count += _count_subgraph_targets(n)
    return count
