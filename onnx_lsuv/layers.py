"""Target discovery: which nodes are LSUV layers, where their weights and biases live.

One recogniser per op family reads one node and returns a ``Layer``, a ``Skipped`` candidate
with its reason, or nothing:

* convolutions: Conv and ConvTranspose (weight in input 1, bias in input 2);
* dense: Gemm (``transB``, ``beta``) and MatMul with a 2-D constant second operand, read
  directly or through a Transpose; a MatMul followed by an Add of a constant vector (PyTorch's
  Linear on 3-D input) is one layer whose bias is that vector and whose output is the Add's;
  a fused projection that one Split cuts into equal parts is scaled per part;
* recurrent: LSTM, GRU and RNN (W scaled per gate, R orthonormal per gate);
* refused: fused attention nodes and targets inside If/Loop/Scan bodies, reported.

A constant is an initializer or a Constant node, reached directly or through Identity chains.
One pass after the recognisers resolves what involves several nodes: weights tied between
targets (set at the first use), other readers of a target weight, and whether a reader is
upstream of the layer by data flow. Layers come in the graph's node order, which ONNX requires
to be topological.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .graph import (
    OUTER_SCOPE,
    SUBGRAPH_OPS,
    ConstRef,
    GraphIndex,
    attribute,
    reached_by_data,
    subgraphs,
)
from .layouts import GATES, RNN_OPS, TARGET_OPS, WeightLayout

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
# Attention exported as one node (com.microsoft and opset 23): its weights are not handled.
FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "PackedAttention",
                       "PackedMultiHeadAttention", "GroupQueryAttention", "DecoderAttention",
                       "DecoderMaskedMultiHeadAttention", "QAttention")
NOT_REACHED = "not reached by the data: its input depends on no graph input"


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
        weight_read_upstream: Whether a node upstream of this one (by data flow) reads the
            weight too, so that rescaling it also changes the layer's own input.
        weight_transpose: MatMul: the Transpose node its weight comes through, if any.
        blocks: The parts of the output that get a variance and a factor each, in the order of
            the output units: ("",) for one; ("q", "k", "v") for a fused projection that a
            Split cuts; the gates ("i", "o", "f", "c", per direction) of a recurrent op, whose
            parts are the input projections W_g x. One matrix group per block.
        recurrent: For LSTM/GRU/RNN, the recurrent weight R.
        recurrent_layout: Its matrix view, one matrix per direction and gate.
        row: Index of the layer's first row in the report (one row per block).
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
    weight_read_upstream: bool = False
    weight_transpose: int | None = None
    blocks: tuple[str, ...] = ("",)
    recurrent: ConstRef | None = None
    recurrent_layout: WeightLayout | None = None
    row: int = 0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def is_recurrent(self) -> bool:
        return self.op in RNN_OPS

    @property
    def rows(self) -> range:
        """The layer's rows in the report."""
        return range(self.row, self.row + len(self.blocks))

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

    @property
    def own_nodes(self) -> set[int]:
        """The graph nodes that make up the layer (op, weight Transpose, bias Add)."""
        return {j for j in (self.node_index, self.weight_transpose, self.bias_add_node)
                if j is not None}


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


Recogniser = Callable[[GraphIndex, int, set], "Layer | Skipped | None"]


def _dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _weight_problem(tensor: onnx.TensorProto, name: str) -> str | None:
    """Why a constant cannot be a target's weight: not floating point, or no elements."""
    if tensor.data_type not in FLOAT_TYPES:
        return "weight is not a floating-point tensor"
    shape = tuple(int(d) for d in tensor.dims)
    if not shape or int(np.prod(shape)) == 0:
        return f"weight {name!r} has no elements (shape {shape})"
    return None


def _why_not_const(index: GraphIndex, name: str) -> str | None:
    """A reason when a non-constant weight is a quantized or cast constant."""
    i = index.producer.get(name)
    if i is None:
        return None
    node = index.graph.node[i]
    if node.op_type in ("DequantizeLinear", "Cast") and index.resolve_const(node.input[0]):
        return f"weight comes through {node.op_type} (quantized or cast weights are not changed)"
    return None


def _new_layer(index: GraphIndex, i: int, w_ref: ConstRef, layout: WeightLayout,
               **fields) -> Layer:
    node = index.graph.node[i]
    return Layer(index=-1, name=index.node_name(i), op=node.op_type, node_index=i,
                 weight=w_ref, layout=layout, dtype=_dtype(index.tensor_proto(w_ref)),
                 **fields)


def _weight_operand(index: GraphIndex, i: int, reached: set[str]):
    """(weight ref, Transpose node) of a Conv/Gemm/MatMul, or Skipped/None when it has none."""
    node = index.graph.node[i]
    name = index.node_name(i)
    if len(node.input) < 2:
        return None
    w_ref = index.resolve_const(node.input[1])
    transpose = None
    if w_ref is None and node.op_type == "MatMul":
        found = _transposed_const(index, node.input[1])
        if found is not None:
            transpose, w_ref = found
    if w_ref is None:
        reason = _why_not_const(index, node.input[1])
        if reason is None and node.op_type == "MatMul" and \
                index.resolve_const(node.input[0]) is not None:
            reason = ("its constant is the first operand (W @ x): only x @ W, or x @ W "
                      "through a Transpose, is handled")
        if reason or node.op_type != "MatMul":  # a MatMul of two activations is no candidate
            return Skipped(name, node.op_type, reason or "weight is not a constant")
        return None
    if index.resolve_const(node.input[0]) is not None:
        return Skipped(name, node.op_type, "both operands are constants")
    if node.input[0] not in reached:
        return Skipped(name, node.op_type, NOT_REACHED)
    problem = _weight_problem(index.tensor_proto(w_ref), w_ref.name)
    if problem:
        return Skipped(name, node.op_type, problem)
    return w_ref, transpose


def recognise_conv(index: GraphIndex, i: int, reached: set[str]):
    """Conv and ConvTranspose: weight in input 1, optional constant bias in input 2."""
    node = index.graph.node[i]
    found = _weight_operand(index, i, reached)
    if not isinstance(found, tuple):
        return found
    w_ref, _ = found
    shape = tuple(int(d) for d in index.tensor_proto(w_ref).dims)
    try:
        layout = WeightLayout(node.op_type, shape, int(attribute(node, "group", 1)))
    except ValueError as err:
        return Skipped(index.node_name(i), node.op_type, str(err))
    bias = bias_input = None
    if len(node.input) > 2 and node.input[2]:
        bias = index.resolve_const(node.input[2])
        if bias is None:
            return Skipped(index.node_name(i), node.op_type, "bias is not a constant")
        bias_input = (i, 2)
    return _new_layer(index, i, w_ref, layout, bias=bias, bias_input=bias_input, bias_scale=1.0,
                      output=node.output[0], output_rank=len(shape))


def recognise_dense(index: GraphIndex, i: int, reached: set[str]):
    """Gemm, and MatMul with a constant 2-D second operand (through a Transpose too)."""
    node = index.graph.node[i]
    name = index.node_name(i)
    found = _weight_operand(index, i, reached)
    if not isinstance(found, tuple):
        return found
    w_ref, transpose = found
    shape = tuple(int(d) for d in index.tensor_proto(w_ref).dims)
    gemm = node.op_type == "Gemm"
    trans = bool(attribute(node, "transB", 0)) if gemm else transpose is not None
    try:
        layout = WeightLayout(node.op_type, shape, 1, trans)
    except ValueError as err:
        return Skipped(name, node.op_type, str(err))
    bias = bias_input = None
    bias_scale = 1.0
    output = node.output[0]
    if gemm and len(node.input) > 2 and node.input[2]:
        bias = index.resolve_const(node.input[2])
        if bias is None:
            return Skipped(name, node.op_type, "bias is not a constant")
        bias_input = (i, 2)
        bias_scale = float(attribute(node, "beta", 1.0))
    elif not gemm:
        add = _matmul_bias(index, i, layout.output_units)
        if add is not None:
            j, pos, bias = add
            bias_input = (j, pos)
            output = index.graph.node[j].output[0]
    rank = 2 if gemm else None
    blocks = ("",)
    parts = _equal_split(index, output, rank)
    if parts > 1:  # a fused projection (QKV): orthonormal and scaled per part
        try:
            layout = WeightLayout(node.op_type, shape, parts, trans)
            blocks = ("q", "k", "v") if parts == 3 else tuple(f"p{k}" for k in range(parts))
        except ValueError:
            pass
    return _new_layer(index, i, w_ref, layout, bias=bias, bias_input=bias_input,
                      bias_scale=bias_scale, output=output, output_rank=rank, blocks=blocks,
                      weight_transpose=transpose)


def recognise_recurrent(index: GraphIndex, i: int, reached: set[str]):
    """LSTM, GRU, RNN: W scaled per gate (its input projections), R orthonormal per gate."""
    node = index.graph.node[i]
    name = index.node_name(i)
    if len(node.input) < 3:
        return None
    if node.input[0] not in reached:
        return Skipped(name, node.op_type, NOT_REACHED)
    if len(node.input) > 4 and node.input[4] and index.opset < 11:
        return Skipped(name, node.op_type, "sequence_lens below opset 11 (no Range) is not handled")
    w_ref, r_ref = index.resolve_const(node.input[1]), index.resolve_const(node.input[2])
    if w_ref is None or r_ref is None:
        return Skipped(name, node.op_type, "W or R is not a constant")
    w, r = index.tensor_proto(w_ref), index.tensor_proto(r_ref)
    problem = _weight_problem(w, w_ref.name) or _weight_problem(r, r_ref.name)
    if problem:
        return Skipped(name, node.op_type, problem)
    gates = GATES[node.op_type]
    dirs = int(w.dims[0])
    try:
        layout = WeightLayout(node.op_type, tuple(w.dims), dirs * len(gates))
        r_layout = WeightLayout(node.op_type, tuple(r.dims), dirs * len(gates))
    except ValueError as err:
        return Skipped(name, node.op_type, str(err))
    prefixes = ("fw.", "bw.") if dirs == 2 else ("",)
    bias = index.resolve_const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    return _new_layer(index, i, w_ref, layout, bias=bias,
                      bias_input=(i, 3) if bias is not None else None, bias_scale=1.0,
                      output="", output_rank=None,
                      blocks=tuple(p + g for p in prefixes for g in gates),
                      recurrent=r_ref, recurrent_layout=r_layout)


def recognise_fused_attention(index: GraphIndex, i: int, reached: set[str]):
    node = index.graph.node[i]
    consts = [n for n in node.input if n and index.resolve_const(n) is not None]
    if not consts:
        return None
    return Skipped(index.node_name(i), node.op_type,
                   f"fused attention node: its weights ({', '.join(consts)}) are not changed")


def recognise_subgraph(index: GraphIndex, i: int, reached: set[str]):
    node = index.graph.node[i]
    inner = _count_subgraph_targets(node)
    if not inner:
        return None
    return Skipped(index.node_name(i), node.op_type, f"{inner} target op(s) inside a subgraph")


_DEFAULT_DOMAIN = ("", "ai.onnx")
# op type -> (recogniser, domains it applies to; None: any)
RECOGNISERS: dict[str, tuple[Recogniser, tuple[str, ...] | None]] = {
    **{op: (recognise_conv, _DEFAULT_DOMAIN) for op in ("Conv", "ConvTranspose")},
    **{op: (recognise_dense, _DEFAULT_DOMAIN) for op in ("Gemm", "MatMul")},
    **{op: (recognise_recurrent, _DEFAULT_DOMAIN) for op in RNN_OPS},
    **{op: (recognise_fused_attention, None) for op in FUSED_ATTENTION_OPS},
    **{op: (recognise_subgraph, _DEFAULT_DOMAIN) for op in SUBGRAPH_OPS},
}


def find_layers(model: onnx.ModelProto) -> Discovery:
    """Find the LSUV target layers of ``model``'s main graph, in topological order.

    Args:
        model: The model (its external data, if any, already loaded).

    Returns:
        The targets, and the candidates that were skipped with the reason.
    """
    graph = model.graph
    opset = next((int(o.version) for o in model.opset_import if o.domain in _DEFAULT_DOMAIN), 0)
    index = GraphIndex(graph, opset)
    reached = reached_by_data(model)
    found = []
    for i, node in enumerate(graph.node):
        entry = RECOGNISERS.get(node.op_type)
        if entry is None or (entry[1] is not None and node.domain not in entry[1]):
            continue
        result = entry[0](index, i, reached)
        if result is not None:
            found.append(result)
    return _resolve(index, found)


def _resolve(index: GraphIndex, found: list) -> Discovery:
    """Ties and shared readers: a weight read by several targets is set at its first use (its
    later users are reported), every other reader is named, and a reader upstream of the layer
    by data flow marks it ``weight_read_upstream``. Numbers the layers and their report rows."""
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    owner: dict[ConstRef, Layer] = {}
    for item in found:
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        refs = [r for r in (item.weight, item.recurrent) if r is not None]
        first = next((owner[r] for r in refs if r in owner), None)
        if first is not None:
            first.shared_weight_users.append(item.name)
            what = "weights" if item.is_recurrent else "weight"
            skipped.append(Skipped(item.name, item.op,
                                   f"{what} tied to layer {first.name} (set at first use)"))
            continue
        item.index = len(layers)
        item.row = layers[-1].row + len(layers[-1].blocks) if layers else 0
        for r in refs:
            owner[r] = item
        layers.append(item)
    for layer in layers:
        users = [j for j, _ in index.users_of_const(layer.weight) if j not in layer.own_nodes]
        for j in users:
            if index.node_name(j) not in layer.shared_weight_users:
                layer.shared_weight_users.append(index.node_name(j))
        if users:
            upstream = index.ancestors(layer.node_index)
            layer.weight_read_upstream = any(j in upstream for j in users)
    return Discovery(layers, skipped)


def _matmul_bias(index: GraphIndex, i: int, n_out: int) -> tuple[int, int, ConstRef] | None:
    """The Add after MatMul node ``i`` that adds a constant vector of length ``n_out``."""
    out = index.graph.node[i].output[0]
    users = index.consumers.get(out, [])
    if len(users) != 1 or out in index.graph_outputs or users[0][1] == OUTER_SCOPE:
        return None
    j, pos = users[0]
    add = index.graph.node[j]
    if add.op_type != "Add" or add.domain not in _DEFAULT_DOMAIN:
        return None
    other = 1 - pos
    ref = index.resolve_const(add.input[other])
    if ref is None:
        return None
    shape = tuple(index.tensor_proto(ref).dims)
    if not shape or shape[-1] != n_out or int(np.prod(shape)) != n_out:
        return None
    return j, other, ref


def _transposed_const(index: GraphIndex, name: str) -> tuple[int, ConstRef] | None:
    """(Transpose node, constant) when ``name`` is a 2-D constant read through a Transpose."""
    i = index.producer.get(name)
    if i is None:
        return None
    node = index.graph.node[i]
    if node.op_type != "Transpose" or node.domain not in _DEFAULT_DOMAIN:
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
    if node.op_type != "Split" or node.domain not in _DEFAULT_DOMAIN or users[0][1] != 0:
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
            and all(r.op_type == "Max" and r.domain in _DEFAULT_DOMAIN for r in readers))


def _count_subgraph_targets(node: onnx.NodeProto) -> int:
    count = 0
    for g in subgraphs(node):
        for n in g.node:
            if n.op_type in TARGET_OPS or n.op_type in RNN_OPS:
                count += 1
            elif n.op_type in SUBGRAPH_OPS:
                count += _count_subgraph_targets(n)
    return count
