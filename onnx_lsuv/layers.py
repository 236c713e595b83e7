"""Target discovery: which nodes are LSUV layers, where their weights and biases live.

One recogniser per op family reads one node and returns a ``Layer``, a ``Skipped`` candidate
with its reason, or nothing:

* convolutions: Conv and ConvTranspose (weight in input 1, bias in input 2);
* dense: Gemm (``transB``, ``beta``) and MatMul with a 2-D constant second operand; a fused
  projection that one Split cuts into equal parts is scaled per part;
* recurrent: LSTM, GRU and RNN (W scaled per gate, R orthonormal per gate);
* subgraphs: the layers of an If's branch that the data takes (nested Ifs too) and the
  MatMul/Gemm layers of a Loop/Scan body (``recognise_subgraph``); the rest reported;
* refused: fused attention nodes, reported.

A recurrence written as a Loop or Scan body, or unrolled into steps, has R's rule too: the
weight that multiplies the previous state (its input computed from a carried state, its output
flowing back into that state, through no other layer) is orthonormal per gate and not scaled.

A weight is a constant (an initializer or a Constant node) read directly, or through a chain
of layout ops on one (Transpose, Slice, Reshape, Squeeze, Unsqueeze, Identity, Flatten, Split,
a float Cast, and a Concat of such chains that uses each stored element at most once:
``weight_chain``). A recurrent op's W, R and B may join several constants (PyTorch's
TorchScript exporter without constant folding leaves its gate reorder and the directions' and
biases' Concats in the graph). A layer without a bias input takes as its bias the constant of
an Add that follows it through shape-only ops (Reshape, Squeeze, Unsqueeze, Transpose,
Identity), when that constant lines up with its output units: PyTorch's Linear on 3-D input
(MatMul -> Add), tf2onnx's Conv1D (Conv -> Squeeze -> Add) and Dense on 3-D input (MatMul ->
Reshape -> Add), paddle2onnx's conv bias (Conv -> Add of [1, C, 1, 1]). The layer's output is
then that Add's.

One pass after the recognisers resolves what involves several nodes: a weight read by several
target nodes in the same way is one layer measured over all its uses (an unrolled recurrence,
a shared conv), with their shared bias as its bias; a weight read in different ways is set at
its first use (the others are reported as tied); a weight also read by a node that is not a
target (an embedding's Gather tied to an LM head) is left alone unless selected; a kernel
that looks hand-set (integer values, such as YOLOv8's fixed DFL conv), or a weight the options
name ``fixed`` (a framework's non-trainable tensor), is left alone unless selected; and the
user's ``--exclude`` / ``--include`` patterns apply. Layers come in the graph's node order,
which ONNX requires to be topological.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx

from .baselines import BASELINES
from .graph import (
    INDEX_OPS,
    OUTER_SCOPE,
    SUBGRAPH_OPS,
    BodyIndex,
    BranchIndex,
    ConstRef,
    GraphIndex,
    Scope,
    attribute,
    outer_reads,
    reached_by_data,
    state_pairs,
    subgraphs,
)
from .layouts import GATES, RNN_OPS, TARGET_OPS, WeightLayout
from .weight_chain import WeightChain, build_chain, trace_chain

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
# A layer whose output the data does not move computes a constant of the model (an unfolded
# bias A @ B, a table built from constants): no layer on the data, left alone by rule.
NOT_REACHED = ("not reached by the data: its input depends on no graph input, so it computes a "
               "constant of the model: left alone")
NOT_ON_DATA = "both operands are constants, so it computes a constant of the model: left alone"
# Ops that only move or reinterpret a tensor's elements: a weight fed as a graph input may come
# through them.
_PASS_THROUGH = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast",
                 "Slice", "Split", "Concat")
# Which branch of each If the data takes, by (the scope of the graph holding the If, its
# index there): True for then_branch, False for else_branch, None where the batches of a
# stream disagree. Evaluated once on the data (``lsuv``); an If not listed was not evaluated.
Branches = dict[tuple[Scope, int], "bool | None"]


@dataclass(frozen=True)
class Use:
    """One node that applies a layer's weight, with what follows it up to its output.

    Attributes:
        node_index: The target node (Conv, Gemm, MatMul, ...).
        output: The tensor whose statistics count (after the bias, if any).
        output_rank: Rank of ``output`` when known, else None.
        out_axis: Axis of ``output`` that holds the output units: counted from the front when
            the rank is known, from the end (negative) otherwise.
        bias_input: (node, input position) through which this use reads its bias, if any.
        nodes: Every node of the use: the target node, its weight chain, the shape ops and
            the bias Add after it.
        unit_shape: When a Reshape spread the output units over the last axes (attention
            heads: 16 units as 2 x 8), their shape there; None when they are on one axis.
        chain_nodes: The nodes of its weight's and bias's chains of layout ops.
    """

    node_index: int
    output: str
    output_rank: int | None
    out_axis: int
    bias_input: tuple[int, int] | None
    nodes: frozenset[int]
    unit_shape: tuple[int, ...] | None = None
    chain_nodes: frozenset[int] = frozenset()


@dataclass
class Layer:
    """One LSUV target layer.

    Attributes:
        index: Position among the targets (topological).
        name: The node's name (or ``op_<node index>`` when it has none).
        op: ONNX op type.
        node_index: Index of the node in ``graph.node``.
        weight: Where the weight is stored.
        layout: Matrix view of the weight as the layer reads it (through ``chain``).
        dtype: The weight's numpy dtype as the layer reads it.
        bias: Where the bias lives, if the layer has a constant one.
        bias_input: (node index, input position) through which the layer reads its bias.
        bias_scale: Factor the op applies to the bias (Gemm's ``beta``; 1 otherwise).
        output: The tensor whose variance LSUV sets (after the bias).
        output_rank: Rank of ``output`` when known (Conv: weight rank; Gemm: 2).
        out_axis: The axis of ``output`` holding the output units (see ``Use.out_axis``).
        out_nodes: The shape ops and the bias Add between the node and ``output``.
        unit_shape: See ``Use.unit_shape``.
        chain: The layout ops between the stored weight and the node, if any.
        bias_chain: The layout ops between the stored bias and the node reading it, if any.
        more_uses: Other target nodes that apply the same weight in the same way: the layer is
            measured over all its uses, pooled.
        body: For a layer inside a Loop or Scan body: (the Loop/Scan node's index in the main
            graph, the layer's node index in the body). ``node_index`` is then the Loop's, and
            ``output``, ``out_nodes`` and the chains refer to the body; the layer is measured
            over every iteration (its output exposed as a scan output on measuring copies).
            For a layer inside an If branch: (the outermost If's index in the main graph,
            the layer's node index in its branch), with ``branch`` saying where that is.
        branch: For a layer inside the branch of an If that the data takes: the scope of
            that branch (``graph.Scope``: the If and the branch per level, nested Ifs
            too). ``body`` is set as for a Loop/Scan body's layer; the layer is measured
            where the branch computes it (its output exposed as a new output of each If on
            the way, on measuring copies) and its weight written where it lives (``weight``
            and ``bias`` carry their scope).
        within: The names of the enclosing Ifs, each also as "<If>/<branch>", outermost
            first: ``--exclude`` and ``--include`` match them too.
        disjoint_readers: Nodes of other layers (excluded ones too) that read elements of
            the same stored weight disjoint from this layer's (Slices or one Split of one
            kernel), decided by their chains' gathers: rescaling this layer leaves what they
            read alone.
        shared_weight_users: Other consumers of the weight tensor (node names), if any.
        weight_read_upstream: Whether rescaling the weight also changes the layer's own input:
            a node upstream of it (by data flow) reads the weight too, or one use of it feeds
            another (an unrolled recurrence).
        blocks: The parts of the output that get a variance and a factor each, in the order of
            the output units: ("",) for one; ("q", "k", "v") for a fused projection that a
            Split cuts; the gates ("i", "o", "f", "c", per direction) of a recurrent op, whose
            parts are the input projections W_g x. One matrix group per block.
        recurrent: For LSTM/GRU/RNN, the recurrent weight R.
        recurrent_layout: Its matrix view, one matrix per direction and gate (as the op reads
            it, through ``recurrent_chain``).
        recurrent_chain: The layout ops between the stored R and the op, if any (torch's gate
            reorder left in the graph).
        multiplies_state: The weight multiplies a recurrence's previous state, as an
            LSTM/GRU/RNN op's R does, in a recurrence written as a Loop or Scan body or
            unrolled into steps (``_feeds_back``): it gets R's rule, orthonormal per gate
            (its blocks) and never scaled; its variance is measured and reported, not judged.
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
    out_axis: int = -1
    out_nodes: tuple[int, ...] = ()
    unit_shape: tuple[int, ...] | None = None
    chain: WeightChain | None = None
    bias_chain: WeightChain | None = None
    more_uses: list[Use] = field(default_factory=list)
    body: tuple[int, int] | None = None
    branch: Scope = ()
    within: tuple[str, ...] = ()
    disjoint_readers: set[int] = field(default_factory=set)
    shared_weight_users: list[str] = field(default_factory=list)
    weight_read_upstream: bool = False
    blocks: tuple[str, ...] = ("",)
    recurrent: ConstRef | None = None
    recurrent_layout: WeightLayout | None = None
    recurrent_chain: WeightChain | None = None
    multiplies_state: bool = False
    row: int = 0

    @property
    def stored_weights(self) -> list[ConstRef]:
        """Every stored constant the layer's weights (W, and R) are gathered from: a chain may
        join several (torch's bidirectional LSTM: the forward and the reverse weight)."""
        refs = [self.weight] + ([r for r, _ in self.chain.more] if self.chain else [])
        if self.recurrent is not None:
            refs.append(self.recurrent)
            refs += [r for r, _ in self.recurrent_chain.more] if self.recurrent_chain else []
        return list(dict.fromkeys(refs))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight's shape as the layer reads it."""
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
    def chains(self) -> list[WeightChain]:
        """The layer's chains of layout ops: weight, bias and recurrent weight, where any."""
        return [c for c in (self.chain, self.bias_chain, self.recurrent_chain) if c]

    @property
    def chain_node_set(self) -> set[int]:
        """The nodes of the layer's own chains, in the graph that holds it."""
        return {j for c in self.chains for j in c.nodes}

    @property
    def first_use(self) -> Use:
        if self.body is not None:  # in the main graph, the layer is its Loop/Scan node
            return Use(self.node_index, self.output, self.output_rank, self.out_axis, None,
                       frozenset({self.node_index}), self.unit_shape)
        chains = self.chain_node_set
        return Use(self.node_index, self.output, self.output_rank, self.out_axis,
                   self.bias_input, frozenset({self.node_index, *self.out_nodes, *chains}),
                   self.unit_shape, frozenset(chains))

    @property
    def uses(self) -> list[Use]:
        """Every node applying the weight: the layer's own first, then ``more_uses``."""
        return [self.first_use, *self.more_uses]

    @property
    def chain_nodes(self) -> set[int]:
        """The nodes of every use's weight and bias chains."""
        return {j for use in self.uses for j in use.chain_nodes}

    @property
    def local_nodes(self) -> set[int]:
        """The nodes of the layer in the graph that holds it: ``own_nodes`` in the main
        graph; in a Loop/Scan body or If branch, its node, shape ops, bias Add and chains
        there."""
        if self.body is None:
            return self.own_nodes
        return {self.body[1], *self.out_nodes, *self.chain_node_set}

    @property
    def own_nodes(self) -> set[int]:
        """The graph nodes that make up the layer (every use with its chain, shape ops, Add)."""
        return {j for use in self.uses for j in use.nodes}


@dataclass
class Skipped:
    """A candidate that is not a target, and why.

    Two kinds, which the exit code tells apart. Left alone by a documented rule
    (``by_rule``): the user's own selection (``excluded``), or ``left_alone``: a hand-set
    kernel, a quantised or integer weight, a weight computed from the data, a tie to another
    reader that writing it would change, one with no elements. Every other candidate is one a
    user would expect initialised that onnx-lsuv could not initialise or measure (a layer
    in an If branch the data does not take, a weight it cannot trace, an op it does not
    handle): not on target, so the run exits 1 and ``--check`` 3, naming it.
    """

    name: str
    op: str
    reason: str
    excluded: bool = False
    left_alone: bool = False
    within: tuple[str, ...] = ()  # the enclosing Ifs' names, as ``Layer.within``

    @property
    def by_rule(self) -> bool:
        """Left alone by a documented rule (or the user's selection): not a failure."""
        return self.excluded or self.left_alone


@dataclass(frozen=True)
class Selection:
    """The user's choice of layers: glob patterns (``fnmatch``, case-sensitive) matched against
    a layer's node name, its weight's name and its op type.

    ``exclude`` removes matching layers; ``include`` takes matching layers whatever else
    holds, overriding ``exclude`` and the layers left alone by default (a weight also read
    by a node that is not a target; a kernel that looks hand-set). So ``exclude=("*",),
    include=("Conv",)`` keeps only the convolutions.

    ``fixed`` names weights (ONNX tensor names, with why) that are not to be trained, such as
    a framework's buffers (``LSUVOptions.fixed``): a layer reading one is left alone, by
    rule, unless ``include`` takes it.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fixed: tuple[tuple[str, str], ...] = ()

    def fixed_reason(self, layer: Layer) -> str | None:
        """Why the layer is left alone when one of its stored weights (W or R, every constant
        their chains join) is in ``fixed``: by its scoped name (one in an If branch), or by
        its bare name, which names every tensor of that name."""
        why = dict(self.fixed)
        for ref in layer.stored_weights:
            key = next((k for k in (ref.scoped_name, ref.name) if k in why), None)
            if key is not None:
                return f"its weight {ref.name!r} is {why[key]}: left alone"
        return None

    def matches(self, patterns: Sequence[str], names: Sequence[str]) -> str | None:
        """The first pattern that matches one of ``names``, if any."""
        return next((p for p in patterns for n in names if n and fnmatch.fnmatchcase(n, p)),
                    None)


@dataclass
class Discovery:
    layers: list[Layer]
    skipped: list[Skipped]
    # the include / exclude patterns that match no candidate (no node name, weight name or op
    # type): options that do nothing, which the run says
    unused_patterns: list[str] = field(default_factory=list)


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


# What to do about a weight computed from constants (a weight normalisation), in the words of
# the framework that exported the model (its ModelProto's producer_name).
_COMPUTED_WEIGHT_ADVICE = {
    "pytorch": "as a parametrisation such as weight_norm is under torch's dynamo exporter: "
               "export with the TorchScript exporter (torch.onnx.export(..., dynamo=False)) or "
               "remove the parametrisation before export (torch.nn.utils.parametrize."
               "remove_parametrizations, torch.nn.utils.remove_weight_norm)",
    "jax2onnx": "as a Flax weight normalisation (flax.linen.WeightNorm, or a kernel scaled in "
                "__call__) computes it: export the model without the wrapper (its kernel as a "
                "plain parameter), initialise, then wrap it again",
    "tf2onnx": "as a Keras weight normalisation (a WeightNormalization wrapper, or a kernel "
               "computed in call()) computes it: export the model without the wrapper (its "
               "kernel as a plain weight), initialise, then wrap it again",
    "paddle": "as paddle.nn.utils.weight_norm computes it: remove it before export "
              "(paddle.nn.utils.remove_weight_norm), initialise, then apply it again",
}
_COMPUTED_WEIGHT_ADVICE["keras"] = _COMPUTED_WEIGHT_ADVICE["tf2onnx"]
_COMPUTED_WEIGHT_ADVICE["paddle2onnx"] = _COMPUTED_WEIGHT_ADVICE["paddle"]


def computed_weight_advice(producer: str) -> str:
    """How to make a computed weight a constant, for the framework that wrote the model
    (``producer_name``: pytorch, jax2onnx, tf2onnx, paddle2onnx/PaddlePaddle); any other
    producer gets the advice without a framework's names."""
    key = (producer or "").lower()
    key = "paddle" if key.startswith("paddle") else key
    return _COMPUTED_WEIGHT_ADVICE.get(key, (
        "as a weight normalisation or another parametrisation computes it: export the model "
        "with the weight as a plain constant (remove the parametrisation before export, or "
        "fold it into the weight), initialise, then apply it again; PyTorch: export with "
        "torch.onnx.export(..., dynamo=False) or torch.nn.utils.parametrize."
        "remove_parametrizations first"))


def _why_not_const(index: GraphIndex, name: str, reached: set[str]) -> tuple[str, bool]:
    """Why a weight input is not a constant (or a chain of layout ops on one), with a hint;
    and whether that leaves it alone by a documented rule (a quantised weight, a weight
    computed from the data) rather than as a layer that could not be initialised."""
    i = index.producer.get(name)
    node = index.graph.node[i] if i is not None else None
    if node is not None and node.op_type in ("DequantizeLinear", "Cast") and \
            index.resolve_const(node.input[0]):
        return (f"weight comes through {node.op_type} (quantized or cast weights are not "
                "changed)", True)
    if name in reached:
        return "weight depends on the input data (a dynamic weight): not a target", True
    if node is not None:
        upstream = index.ancestors(i) | {i}
        ops = sorted({index.graph.node[j].op_type for j in upstream} - {"Constant", "Identity"})
        return (f"weight is computed in the graph from constants ({', '.join(ops)}), "
                + computed_weight_advice(getattr(index, "exporter", "")), False)
    return "weight is not a constant", False


def _fed_weight(index: GraphIndex, name: str) -> str | None:
    """The graph input (not an initializer) that a weight operand is, directly or through ops
    that only move its elements; None for anything else."""
    inits = {t.name for t in index.graph.initializer}
    inputs = {t.name for t in index.graph.input} - inits
    seen = set()
    while name and name not in seen:
        seen.add(name)
        if name in inputs:
            return name
        i = index.producer.get(name)
        if i is None or index.graph.node[i].op_type not in _PASS_THROUGH:
            return None
        name = index.graph.node[i].input[0]
    return None


def _new_layer(index: GraphIndex, i: int, w_ref: ConstRef, layout: WeightLayout,
               chain: WeightChain | None, **fields) -> Layer:
    node = index.graph.node[i]
    return Layer(index=-1, name=index.node_name(i), op=node.op_type, node_index=i,
                 weight=w_ref, layout=layout, dtype=_read_dtype(index, w_ref, chain),
                 chain=chain, **fields)


def _read_dtype(index: GraphIndex, ref: ConstRef, chain: WeightChain | None) -> np.dtype:
    """The weight's dtype as the layer reads it: the stored one, or the last Cast's."""
    return chain.dtype if chain else _dtype(index.weight_proto(ref))


def _weight_operand(index: GraphIndex, i: int, reached: set[str]):
    """(weight ref, chain or None) of a Conv/Gemm/MatMul, or Skipped/None when it has none."""
    node = index.graph.node[i]
    name = index.node_name(i)
    if len(node.input) < 2:
        return None
    w_ref, chain, unhandled = _constant_or_chain(index, node.input[1])
    if unhandled:
        return Skipped(name, node.op_type, f"weight comes through {unhandled}")
    if w_ref is None:
        if node.op_type == "MatMul" and (index.resolve_weight(node.input[0]) is not None
                                         or trace_chain(index, node.input[0]) is not None):
            return Skipped(name, node.op_type, "its constant is the first operand (W @ x): "
                           "only x @ W, or x @ W through layout ops, is handled")
        fed = _fed_weight(index, node.input[1])
        if fed is not None and node.input[0] not in index.downstream({fed}, set()):
            return Skipped(name, node.op_type, (
                f"its weight is the graph input {fed!r}, not a constant: a model exported "
                "without its parameters (torch.onnx.export(..., export_params=False)) cannot be "
                "initialised; export it with its parameters"))
        if node.op_type == "MatMul" and node.input[1] in reached:
            return None  # a MatMul of two activations is no candidate
        why, rule = _why_not_const(index, node.input[1], reached)
        return Skipped(name, node.op_type, why, left_alone=rule)
    if index.resolve_weight(node.input[0]) is not None or \
            index.resolve_const(node.input[0]) is not None:
        return Skipped(name, node.op_type, NOT_ON_DATA, left_alone=True)
    if node.input[0] not in reached:
        return Skipped(name, node.op_type, NOT_REACHED, left_alone=True)
    problem = _weight_problem(index.weight_proto(w_ref), w_ref.name)
    if problem:
        return Skipped(name, node.op_type, problem, left_alone=True)
    return w_ref, chain


def _constant_or_chain(index: GraphIndex, name: str, several: bool = False):
    """(stored constant, chain or None, "") for an input that is a constant or a chain of
    layout ops on one (with ``several``, a chain may join several constants: the chain then
    names the others); (None, None, why) for a traced chain that is no pure rearrangement of
    one constant's elements; (None, None, "") for anything else."""
    ref = index.resolve_weight(name)
    if ref is not None:
        return ref, None, ""
    traced = trace_chain(index, name)
    if traced is None:
        return None, None, ""
    refs, nodes = traced
    ops = " -> ".join(index.graph.node[j].op_type for j in nodes)
    if len(refs) > 1 and not several:
        return None, None, (f"{ops}, which joins {len(refs)} constants "
                            f"({', '.join(r.name for r in refs)}) (not handled)")
    chain = build_chain(index, refs, nodes, name)
    if chain is None:
        return None, None, f"{ops}, which is not a rearrangement of its constant's elements " \
            "(not handled)"
    return refs[0], chain, ""


def _bias_const(index: GraphIndex, name: str,
                several: bool = False) -> tuple[ConstRef, WeightChain | None] | None:
    """A bias input: a constant, or a chain of layout ops on one (Flax reshapes its bias
    vector to [1, 1, 1, C] in the graph), or with ``several`` on several (torch's LSTM joins
    b_ih and b_hh into B)."""
    ref, chain, _ = _constant_or_chain(index, name, several)
    return (ref, chain) if ref is not None else None


def _shape(index: GraphIndex, ref: ConstRef, chain: WeightChain | None) -> tuple[int, ...]:
    return chain.shape if chain else tuple(int(d) for d in index.weight_proto(ref).dims)


def recognise_conv(index: GraphIndex, i: int, reached: set[str]):
    """Conv and ConvTranspose: weight in input 1, constant bias in input 2 or a separate Add."""
    node = index.graph.node[i]
    found = _weight_operand(index, i, reached)
    if not isinstance(found, tuple):
        return found
    w_ref, chain = found
    shape = _shape(index, w_ref, chain)
    try:
        layout = WeightLayout(node.op_type, shape, int(attribute(node, "group", 1)))
    except ValueError as err:
        return Skipped(index.node_name(i), node.op_type, str(err))
    fields = dict(bias=None, bias_input=None, bias_scale=1.0, output=node.output[0],
                  output_rank=len(shape), out_axis=1)
    if len(node.input) > 2 and node.input[2]:
        bias = _bias_const(index, node.input[2])
        if bias is None:
            return Skipped(index.node_name(i), node.op_type, "bias is not a constant")
        fields.update(bias=bias[0], bias_chain=bias[1], bias_input=(i, 2))
    else:
        fields.update(_following_bias(index, i, layout.output_units, 1, len(shape)))
    return _new_layer(index, i, w_ref, layout, chain, **fields)


def recognise_dense(index: GraphIndex, i: int, reached: set[str]):
    """Gemm, and MatMul with a constant 2-D second operand (through layout ops too)."""
    node = index.graph.node[i]
    name = index.node_name(i)
    found = _weight_operand(index, i, reached)
    if not isinstance(found, tuple):
        return found
    w_ref, chain = found
    shape = _shape(index, w_ref, chain)
    gemm = node.op_type == "Gemm"
    trans = bool(attribute(node, "transB", 0)) if gemm else False
    try:
        layout = WeightLayout(node.op_type, shape, 1, trans)
    except ValueError as err:
        return Skipped(name, node.op_type, str(err))
    fields = dict(bias=None, bias_input=None, bias_scale=1.0, output=node.output[0],
                  output_rank=2 if gemm else None, out_axis=1 if gemm else -1)
    if gemm and len(node.input) > 2 and node.input[2]:
        bias = _bias_const(index, node.input[2])
        if bias is None:
            return Skipped(name, node.op_type, "bias is not a constant")
        fields.update(bias=bias[0], bias_chain=bias[1], bias_input=(i, 2),
                      bias_scale=float(attribute(node, "beta", 1.0)))
    else:
        fields.update(_following_bias(index, i, layout.output_units, fields["out_axis"],
                                      fields["output_rank"]))
    blocks = ("",)
    last = fields.get("unit_shape") is None and (
        fields["output_rank"] is None and fields["out_axis"] == -1 or
        fields["output_rank"] is not None and fields["out_axis"] == fields["output_rank"] - 1)
    parts = _equal_split(index, fields["output"], fields["output_rank"]) if last else 0
    if parts > 1:  # a fused projection (QKV): orthonormal and scaled per part
        try:
            layout = WeightLayout(node.op_type, shape, parts, trans)
            blocks = ("q", "k", "v") if parts == 3 else tuple(f"p{k}" for k in range(parts))
        except ValueError:
            pass
    return _new_layer(index, i, w_ref, layout, chain, blocks=blocks, **fields)


def recognise_recurrent(index: GraphIndex, i: int, reached: set[str]):
    """LSTM, GRU, RNN: W scaled per gate (its input projections), R orthonormal per gate.

    W, R and B are constants, or chains of layout ops on them (``weight_chain``): PyTorch's
    TorchScript exporter without constant folding leaves its reorder of torch's gates (i, f,
    g, o) into ONNX's (i, o, f, c) in the graph, as Unsqueeze(Concat(Slice(w), ...)), and
    joins B from b_ih and b_hh. Gates are the ONNX op's, as it reads W and R; the new values
    go back into the stored tensors through the inverse of each chain."""
    node = index.graph.node[i]
    name = index.node_name(i)
    if len(node.input) < 3:
        return None
    if node.input[0] not in reached:
        return Skipped(name, node.op_type, NOT_REACHED, left_alone=True)
    if len(node.input) > 4 and node.input[4] and index.opset < 11:
        return Skipped(name, node.op_type, "sequence_lens below opset 11 (no Range) is not handled")
    found = []
    for what, x in (("W", node.input[1]), ("R", node.input[2])):
        ref, chain, unhandled = _constant_or_chain(index, x, several=True)
        if unhandled:
            return Skipped(name, node.op_type, f"{what} comes through {unhandled}")
        if ref is None:
            why, rule = _why_not_const(index, x, reached)
            return Skipped(name, node.op_type, f"{what}: {why}", left_alone=rule)
        refs = [ref] + ([r for r, _ in chain.more] if chain else [])
        problem = next((p for r in refs
                        if (p := _weight_problem(index.weight_proto(r), r.name))), None)
        if problem:
            return Skipped(name, node.op_type, problem, left_alone=True)
        found.append((ref, chain))
    (w_ref, w_chain), (r_ref, r_chain) = found
    if _read_dtype(index, w_ref, w_chain) != _read_dtype(index, r_ref, r_chain):
        return Skipped(name, node.op_type, "W and R are read in different dtypes (not handled)")
    gates = GATES[node.op_type]
    w_shape, r_shape = _shape(index, w_ref, w_chain), _shape(index, r_ref, r_chain)
    try:
        dirs = w_shape[0] if len(w_shape) == 3 else 0
        layout = WeightLayout(node.op_type, w_shape, dirs * len(gates))
        r_layout = WeightLayout(node.op_type, r_shape, dirs * len(gates))
    except ValueError as err:
        return Skipped(name, node.op_type, str(err))
    prefixes = ("fw.", "bw.") if dirs == 2 else ("",)
    fields = dict(bias=None, bias_input=None)
    bias = _bias_const(index, node.input[3], several=True) \
        if len(node.input) > 3 and node.input[3] else None
    if bias is not None:
        fields = dict(bias=bias[0], bias_chain=bias[1], bias_input=(i, 3))
    return _new_layer(index, i, w_ref, layout, w_chain, bias_scale=1.0,
                      output="", output_rank=None,
                      blocks=tuple(p + g for p in prefixes for g in gates),
                      recurrent=r_ref, recurrent_layout=r_layout, recurrent_chain=r_chain,
                      **fields)


def recognise_fused_attention(index: GraphIndex, i: int, reached: set[str]):
    """A fused attention node with constant inputs. Its weight matrices (com.microsoft
    Attention's packed qkv weight) are not handled: reported as not initialised. A node whose
    only constants are vectors (MultiHeadAttention's bias of q, k and v, which it reads
    projected by target layers) is left alone by rule, saying so: those layers are set on
    their MatMul outputs, before that bias."""
    node = index.graph.node[i]
    consts = [n for n in node.input if n and index.resolve_const(n) is not None]
    if not consts:
        return None
    name = index.node_name(i)
    if all(len(_shape(index, index.resolve_const(n), None)) <= 1 for n in consts):
        return Skipped(name, node.op_type, f"fused attention node: its biases "
                       f"({', '.join(consts)}) are added inside it to q, k and v, whose "
                       "layers are measured before them: left as they are", left_alone=True)
    return Skipped(name, node.op_type,
                   f"fused attention node: its weights ({', '.join(consts)}) are not changed")


def recognise_einsum(index: GraphIndex, i: int, reached: set[str]):
    """Einsum of the data and a constant float weight of rank 2 or more (through layout ops):
    Flax's nnx.Einsum and jax2onnx's dot_general write a dense layer as Einsum('btd,dh->bth',
    x, W), nnx.Embed.attend a head as Einsum('abc,cd->abd', x, Transpose(table)). A target like
    a MatMul: the weight's labels that the output keeps are its output units, those it sums
    with the data its fan-in (``WeightLayout``'s Einsum view); its bias is a following Add's.
    An Einsum it cannot map so is reported as not initialised, with the reason."""
    node = index.graph.node[i]
    consts = []
    for name in node.input:
        ref, chain, _ = _constant_or_chain(index, name) if name else (None, None, "")
        if ref is None:
            continue
        shape = _shape(index, ref, chain)
        if len(shape) >= 2 and index.weight_proto(ref).data_type in FLOAT_TYPES:
            consts.append(ref.name)
    if not consts:
        return None
    name = index.node_name(i)
    if not any(x in reached for x in node.input if x):
        return Skipped(name, node.op_type, NOT_REACHED, left_alone=True)
    equation = attribute(node, "equation", b"")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    why = _einsum_problem(index, node, equation, reached)
    if why:
        return Skipped(name, node.op_type, f"Einsum {equation!r} with a constant weight "
                       f"({', '.join(consts)}): {why}, so not initialised")
    found = _weight_operand(index, i, reached)
    if not isinstance(found, tuple):
        return found
    w_ref, chain = found
    shape = _shape(index, w_ref, chain)
    (data, weight), out = _einsum_terms(equation)
    if len(shape) != len(weight):
        return Skipped(name, node.op_type, f"Einsum {equation!r}: its weight has rank "
                       f"{len(shape)}, not {len(weight)}, so not initialised")
    units = [label for label in out if label in weight]  # in the output's order
    fan_in = [label for label in weight if label in data]
    layout = WeightLayout("Einsum", shape, perm=tuple(weight.index(label) for label in
                                                      units + fan_in), unit_axes=len(units))
    where = [out.index(label) for label in units]
    rank = None if "." in out else len(out)
    axis = where[0] if rank is not None and len(units) == 1 else -1
    tail = tuple(shape[weight.index(label)] for label in units) if len(units) > 1 else None
    fields = dict(bias=None, bias_input=None, bias_scale=1.0, output=node.output[0],
                  output_rank=rank, out_axis=axis, unit_shape=tail)
    fields.update(_following_bias(index, i, layout.output_units, axis, rank, tail))
    return _new_layer(index, i, w_ref, layout, chain, **fields)


def _einsum_terms(equation: str) -> tuple[list[str], str] | None:
    """The operands' terms and the output's of an Einsum equation, spaces dropped and each
    ellipsis written as one ``.``; an implicit output (no ``->``) is the ellipsis, then the
    labels that occur once, in alphabetical order (numpy's rule). None when malformed."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if not arrow:
        labels = lhs.replace("...", "").replace(",", "")
        out = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in set(labels) if labels.count(c) == 1))
    parts = [t.replace("...", ".", 1) for t in terms + [out]]
    if any(not all(c.isalpha() or c == "." for c in t) or t.count(".") > 1 for t in parts):
        return None
    return parts[:-1], parts[-1]


def _einsum_problem(index: GraphIndex, node: onnx.NodeProto, equation: str,
                    reached: set[str]) -> str | None:
    """Why an Einsum with a constant weight is no dense layer onnx-lsuv can map, or None: it
    must read the data first and the weight second, and each label of the weight be either
    kept in the output (an output unit, on adjacent axes: the last ones, or one axis where
    the output's rank is known) or summed with the data (the fan-in)."""
    if len(node.input) != 2:
        return f"an Einsum of {len(node.input)} operands (only the data's and a weight's)"
    if node.input[0] not in reached:
        return "its constant is the first operand: only Einsum(x, W) is handled"
    terms = _einsum_terms(equation)
    if terms is None:
        return "an equation it does not read"
    (data, weight), out = terms
    if "." in weight:
        return "the weight's term has an ellipsis"
    plain = data.replace(".", "")
    if len(set(weight)) < len(weight) or len(set(plain)) < len(plain) or \
            len(set(out)) < len(out):
        return "a label repeats within a term (a diagonal)"
    shared = [c for c in weight if c in data and c in out]
    if shared:
        return (f"label(s) {', '.join(shared)} of the weight are also the data's and the "
                "output's (a batch-like label on the weight: one matrix per entry) (not "
                "handled)")
    alone = [c for c in weight if c not in data and c not in out]
    if alone:
        return f"label(s) {', '.join(alone)} are summed over the weight alone (not handled)"
    units = [c for c in out if c in weight]
    if not units or len(units) == len(weight):
        return "the weight has no output units or no fan-in"
    where = [out.index(c) for c in units]
    if where != list(range(where[0], where[0] + len(where))):
        return "its output units are on axes that are not adjacent (not handled)"
    if (len(units) > 1 or "." in out) and where[-1] != len(out) - 1:
        return ("its output units are not the output's last axes, and the output's rank is "
                "not known there (not handled)" if len(units) == 1 else
                "its output units are spread over axes that are not the output's last "
                "(not handled)")
    return None


# Layers that other tools fused or quantised, with their weights as constants: ONNX Runtime's
# contrib ops (an optimised model saved by a session) are not handled, so not initialised;
# quantised layers are left alone by rule, as a weight behind DequantizeLinear is.
FUSED_OPS = ("FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv", "NhwcFusedConv",
             "GemmFastGelu")
# Layer ops of the standard domain that are not handled.
OTHER_LAYER_OPS = ("DeformConv",)
# Ops outside the standard domain whose rank-2 constants are no layer weights.
NOT_LAYERS = ("EmbedLayerNormalization", "GatherBlockQuantized")
QUANTISED_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm",
                 "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                 "QLinearConvTranspose", "MatMulBnb4", "MatMulFpQ4")


def recognise_other_layer(index: GraphIndex, i: int, reached: set[str]):
    """A fused or quantised dense or conv op with a constant weight of rank 2 or more: named
    in the report, never passed over in silence."""
    node = index.graph.node[i]
    consts = [n for n in node.input[1:] if n and _weight_like(index, n)]
    if not consts:
        return None
    name = index.node_name(i)
    if node.op_type in QUANTISED_OPS:
        return Skipped(name, node.op_type, f"a quantised layer (weight {consts[0]!r}): "
                       "quantized weights are not changed", left_alone=True)
    if node.op_type in OTHER_LAYER_OPS:
        return Skipped(name, node.op_type, f"{node.op_type} (weight {consts[0]!r}) is not "
                       "handled, so not initialised")
    if node.op_type in FUSED_OPS:
        return Skipped(name, node.op_type, f"a fused {node.domain or 'ai.onnx'} op with a "
                       f"constant weight ({consts[0]!r}), as an optimising runtime saves it: not "
                       "handled, so not initialised (initialise the model before it is "
                       "optimised)")
    return Skipped(name, node.op_type, f"an op onnx-lsuv does not know ({node.domain}."
                   f"{node.op_type}) with a weight-like constant input ({consts[0]!r}): not "
                   "initialised (--exclude it if it is no layer)")


def _weight_like(index: GraphIndex, name: str, floating: bool = False) -> bool:
    """A constant of rank 2 or more (``floating``: of a float type): what a layer's weight
    looks like."""
    ref = index.resolve_const(name)
    if ref is None:
        return False
    tensor = index.tensor_proto(ref)
    return len(tensor.dims) >= 2 and (not floating or tensor.data_type in FLOAT_TYPES)


def recognise_unknown(index: GraphIndex, i: int, reached: set[str],
                      functions: dict[tuple[str, str], onnx.FunctionProto]):
    """A node no recogniser takes: a call of a model-local function whose body holds target
    ops (not handled), or an op outside the standard domain with a weight-like constant
    (unknown, so it fails loudly rather than passing in silence)."""
    node = index.graph.node[i]
    function = functions.get((node.domain, node.op_type))
    if function is not None:
        inner = _count_targets(function.node, functions)
        weights = [x for x in node.input if x and _weight_like(index, x, floating=True)] + [
            n.output[0] for n in function.node if n.op_type == "Constant" and any(
                a.name == "value" and a.t.data_type in FLOAT_TYPES and len(a.t.dims) >= 2
                for a in n.attribute)]
        if not inner or not weights:  # no weights: an attention or norm helper, say
            return None
        return Skipped(index.node_name(i), node.op_type, (
            f"a call of the model-local function {node.domain}.{node.op_type}, whose body holds "
            f"{inner} target op(s): functions are not handled, so not initialised"))
    if node.domain in _DEFAULT_DOMAIN or node.domain == "ai.onnx.ml" or \
            node.op_type in NOT_LAYERS or \
            not any(x and _weight_like(index, x, floating=True) for x in node.input[1:]):
        return None
    return recognise_other_layer(index, i, reached)


def recognise_subgraph(index: GraphIndex, i: int, reached: set[str]):
    """If/Loop/Scan: the layers of the If branch that the data takes (``_branch_layers``);
    the MatMul and Gemm layers of a Loop or Scan body of the main graph whose weights are
    the main graph's constants (read from the enclosing scope or passed through unchanged as
    loop-carried values); every other target op inside a body is reported."""
    node = index.graph.node[i]
    if node.op_type == "If":
        return _branch_layers(index, i, reached) or None
    found: list = []
    handled = 0
    if isinstance(index, BranchIndex):  # a Loop/Scan inside an If branch
        inner = _count_subgraph_targets(node)
        return Skipped(index.node_name(i), node.op_type, (
            f"{inner} target op(s) inside a {node.op_type} body inside an If branch: not "
            "handled, so not initialised")) if inner else None
    if node.op_type in ("Loop", "Scan") and index.opset >= 9:
        found = _body_layers(index, i, reached)
        handled = sum(isinstance(f, Layer) for f in found)
    inner = _count_subgraph_targets(node) - handled
    if inner:
        reasons = sorted({f.reason for f in found if isinstance(f, Skipped)})
        why = f": {'; '.join(reasons)}" if reasons else (
            " (only MatMul and Gemm at the top of a Loop or Scan body, with weights from the "
            "main graph, are handled" + ("; an If inside the body, whose branch may change "
                                         "from one iteration to the next, is not followed"
                                         if _has_if(node) else "") + ")")
        found.append(Skipped(index.node_name(i), node.op_type,
                             f"{inner} target op(s) inside a subgraph left as they are{why}"))
    return found or None


def _has_if(node: onnx.NodeProto) -> bool:
    return any(n.op_type == "If" or (n.op_type in SUBGRAPH_OPS and _has_if(n))
               for g in subgraphs(node) for n in g.node)


def _graph_items(index: GraphIndex, reached: set[str]) -> list:
    """What the recognisers find in ``index``'s graph (the main graph or an If branch), in
    node order: Layers and Skipped candidates."""
    found = []
    for i, node in enumerate(index.graph.node):
        entry = RECOGNISERS.get(node.op_type)
        if entry is None or (entry[1] is not None and node.domain not in entry[1]):
            result = recognise_unknown(index, i, reached, index.functions)
        else:
            result = entry[0](index, i, reached)
        if isinstance(result, list):
            found.extend(result)
        elif result is not None:
            found.append(result)
    return found


def _subgraph_data(sub: GraphIndex, reached: set[str], seeds: set[str] = frozenset(),
                   nested: bool = True) -> set[str]:
    """The tensors of a subgraph (an If branch, a Loop/Scan body) that depend on the data:
    ``seeds``, those it reads from the enclosing scope that do (``reached``), and what it
    computes from them (with ``nested``, through what its own subgraphs read too)."""
    data = set(seeds) | {n for n in sub.consumers if n not in sub.defined and n in reached}
    for node in sub.graph.node:  # topological within the subgraph
        reads = {x for x in node.input if x}
        if nested and node.attribute:
            reads |= outer_reads(node)
        if reads & data:
            data.update(o for o in node.output if o)
    return data


def _branch_layers(index: GraphIndex, i: int, reached: set[str]) -> list:
    """The layers of If node ``i``'s branches (see ``recognise_subgraph``).

    The branch the data takes (``index.branches``; both when no data decides) is searched as
    a graph of its own, by the same recognisers (nested Ifs too): its layers are targets,
    with weights in the branch (initializers, Constant nodes) or in an enclosing scope. A
    layer whose weight or bias another node of the branch also reads is left alone, as in a
    Loop/Scan body; a weight that several target nodes of the branch apply (pooled over its
    uses in the main graph) is reported as not initialised. Every candidate of a branch the
    data does not take is reported as not reached: not initialised, unless the user excludes
    it (``--exclude <If>`` or ``<If>/<branch>``)."""
    node = index.graph.node[i]
    name = index.node_name(i)
    taken = _taken(index, i)
    out = []
    graphs = {a.name: a for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    for a in (graphs[k] for k in ("then_branch", "else_branch") if k in graphs):
        sub = BranchIndex(a.g, index, i, a.name)
        data = _subgraph_data(sub, reached)
        why = _not_taken(name, a.name, taken)
        if why:
            sub.branches = None  # nothing in it runs: every branch inside it counts
        items = _graph_items(sub, data)
        named = {n.name for n in a.g.node if n.name}
        chains = {j for item in items if isinstance(item, Layer) and not item.branch
                  for j in item.chain_node_set}
        pooled = _applied_twice([item for item in items if isinstance(item, Layer)
                                 and not item.branch])
        within = (name, f"{name}/{a.name}")
        for item in items:
            local = not item.within
            if id(item) in pooled and not why:
                item = Skipped(item.name, item.op, (
                    f"its weight {item.weight.name!r} is applied by {pooled[id(item)]} nodes "
                    "of the branch (a layer applied twice, an unrolled recurrence): measuring "
                    "a weight pooled over its uses inside an If branch is not handled, so not "
                    "initialised"))
            if local and item.name not in named:
                item.name = f"{name}/{a.name}/{item.name}"
            item.within = within + item.within
            if isinstance(item, Layer) and local and not why:
                readers = _body_strangers(sub, item, chains)
                if readers:
                    item = Skipped(item.name, item.op, (
                        "its weight or bias is also read inside the branch by "
                        f"{', '.join(readers)}: left alone"), left_alone=True, within=item.within)
            if why and isinstance(item, Layer):
                item = Skipped(item.name, item.op, why, within=item.within)
            elif why and not item.by_rule:
                item.reason = f"{why} (also: {item.reason})"
            if isinstance(item, Layer):
                item.body = (i, item.body[1] if item.branch else item.node_index)
                item.branch = ((i, a.name), *item.branch)
                item.node_index = i
            out.append(item)
    return out


def _applied_twice(layers: list[Layer]) -> dict[int, int]:
    """The layers of one branch whose weight another of them reads too (not disjoint parts
    of it), by id: how many read it. In the main graph such uses are one layer, pooled; in a
    branch that is not handled."""
    shared = {}
    for layer in layers:
        same = [other for other in layers if other.weight == layer.weight
                and (other is layer or not _disjoint(layer, other))]
        if len(same) > 1:
            shared[id(layer)] = len(same)
    return shared


def _taken(index: GraphIndex, i: int):
    """Which branch of If ``i`` the data takes: True (then), False (else), None (the batches
    disagree), "unknown" (not evaluated), or "both" (no data decides: every branch counts)."""
    if index.branches is None:
        return "both"
    return index.branches.get((index.scope, i), "unknown")


def _not_taken(name: str, attr: str, taken) -> str | None:
    """Why the branch ``attr`` of If ``name`` is not searched for targets, or None when it
    is."""
    if taken == "both" or taken is (attr == "then_branch"):
        return None
    accept = f"--exclude {name}/{attr} accepts that"
    if taken is None:
        return (f"in the {attr} of If {name}, whose condition differs between the batches: "
                f"not handled, so not initialised; {accept}")
    if taken == "unknown":
        return (f"in the {attr} of If {name}, whose condition was not evaluated on the data: "
                f"not initialised; {accept}")
    return (f"in the {attr} of If {name}, which the data does not take (its condition is "
            f"{not taken} on the batch): not reached, so not initialised; {accept}")


def _body_layers(index: GraphIndex, i: int, reached: set[str]) -> list:
    """The layers of Loop/Scan node ``i``'s body (see ``recognise_subgraph``)."""
    loop = index.graph.node[i]
    body = next(a.g for a in loop.attribute if a.name == "body")
    sub = BodyIndex(body, index.opset, index, i)
    data = _subgraph_data(sub, reached, {b.name for b in body.input if b.name not in sub.carried},
                          nested=False)
    items = []
    for j, node in enumerate(body.node):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in _DEFAULT_DOMAIN:
            continue
        w = sub.through_identity(node.input[1])
        if w in sub.returned:
            items.append(Skipped(sub.node_name(j), node.op_type, (
                f"its weight is a loop-carried value that {index.node_name(i)} also returns "
                f"as {sub.returned[w]!r}, which the graph reads: left alone"), left_alone=True))
            continue
        items.append(recognise_dense(sub, j, data))
    items = [item for item in items if item is not None]
    # The chains of every body layer are theirs: tf2onnx's GRU slices one kernel for two.
    chains = {j for item in items if isinstance(item, Layer) for j in item.chain_node_set}
    targets = {item.node_index for item in items if isinstance(item, Layer)}
    pairs = [(body.input[p].name, body.output[q].name)
             for p, q in state_pairs(loop, body) if q < len(body.output)]
    out = []
    for item in items:
        if isinstance(item, Skipped):
            out.append(item)
            continue
        j = item.node_index
        readers = _body_strangers(sub, item, chains)
        if readers:
            out.append(Skipped(item.name, item.op, f"its weight is also read inside the body "
                               f"by {', '.join(readers)}: left alone", left_alone=True))
            continue
        if not body.node[j].name:
            item.name = f"{index.node_name(i)}/{item.name}"
        _as_gates(item)
        if any(_feeds_back(sub, [j], {start}, {end}, targets) for start, end in pairs):
            _as_state_weight(sub, item)
        item.body = (i, j)
        item.node_index = i
        item.weight_read_upstream = True  # iterations feed each other, as a rule
        out.append(item)
    return out


def _body_strangers(sub: BodyIndex, layer: Layer, chains: set[int]) -> list[str]:
    """Body nodes other than the layer's own that read the body value of its weight or bias:
    anything but the layer, the body layers' chains (``chains``), and the Identity nodes a
    carried value is returned through."""
    own = {layer.node_index, *layer.out_nodes, *chains}
    sources = []
    node = sub.graph.node[layer.node_index]
    for chain, read in ((layer.chain, node.input[1]), (layer.bias_chain, None)):
        if chain:
            own |= set(chain.nodes)
            sources.append(sub.graph.node[chain.nodes[0]].input[0])
        elif read:
            sources.append(read)
    if layer.bias is not None and layer.bias_chain is None and layer.bias_input is not None:
        holder = sub.graph.node[layer.bias_input[0]]
        sources.append(holder.input[layer.bias_input[1]])
    if layer.recurrent is not None:  # an LSTM/GRU/RNN op in an If branch
        sources.append(node.input[2])
    # Through this layer's chains; the other body layers' chains read their own parts.
    through = layer.chain_node_set
    strangers = set()
    for name in sources:
        readers, _ = sub.readers_through(sub.through_identity(name), through)
        strangers |= {sub.node_name(c) for c, _ in readers if c not in own}
    return sorted(strangers)


_DEFAULT_DOMAIN = ("", "ai.onnx")
# op type -> (recogniser, domains it applies to; None: any)
RECOGNISERS: dict[str, tuple[Recogniser, tuple[str, ...] | None]] = {
    **{op: (recognise_conv, _DEFAULT_DOMAIN) for op in ("Conv", "ConvTranspose")},
    **{op: (recognise_dense, _DEFAULT_DOMAIN) for op in ("Gemm", "MatMul")},
    **{op: (recognise_recurrent, _DEFAULT_DOMAIN) for op in RNN_OPS},
    "Einsum": (recognise_einsum, _DEFAULT_DOMAIN),
    **{op: (recognise_other_layer, None) for op in FUSED_OPS + QUANTISED_OPS + OTHER_LAYER_OPS},
    **{op: (recognise_fused_attention, None) for op in FUSED_ATTENTION_OPS},
    **{op: (recognise_subgraph, _DEFAULT_DOMAIN) for op in SUBGRAPH_OPS},
}


def find_layers(model: onnx.ModelProto, selection: Selection | None = None,
                branches: Branches | None = None) -> Discovery:
    """Find the LSUV target layers of ``model``'s main graph (and of the If branches the
    data takes), in topological order.

    Args:
        model: The model (its external data, if any, already loaded).
        selection: The user's ``--include`` / ``--exclude`` patterns. Defaults to none.
        branches: Which branch of each If the data takes (see ``Branches``). Defaults to
            None: no data decides, and every branch's layers are targets (an init without
            measurement, or a listing of the layers).

    Returns:
        The targets, and the candidates that were skipped with the reason.
    """
    graph = model.graph
    opset = next((int(o.version) for o in model.opset_import if o.domain in _DEFAULT_DOMAIN), 0)
    index = GraphIndex(graph, opset)
    index.branches = branches
    index.functions = {(f.domain, f.name): f for f in model.functions}
    index.exporter = model.producer_name  # advice in the words of the exporting framework
    found = _graph_items(index, reached_by_data(model))
    return _resolve(index, found, selection or Selection())


def _names(layer: Layer) -> list[str]:
    return [layer.name, layer.weight.name, layer.op, *layer.within]


def _resolve(index: GraphIndex, found: list, selection: Selection) -> Discovery:
    """What involves several nodes or the user's choice (see the module docstring). Numbers the
    layers and their report rows."""
    skipped: list[Skipped] = []
    candidates: list[Layer] = []
    recognised = [item for item in found if isinstance(item, Layer)]
    for item in found:
        if isinstance(item, Skipped):
            pattern = None if item.by_rule else selection.matches(
                selection.exclude, [item.name, item.op, *item.within])
            if pattern:  # a candidate it could not initialise, which the user left out
                item.reason += f" (excluded by --exclude {pattern!r})"
                item.excluded = True
            skipped.append(item)
            continue
        forced = selection.matches(selection.include, _names(item))
        pattern = selection.matches(selection.exclude, _names(item))
        if pattern and not forced:
            skipped.append(Skipped(item.name, item.op, f"excluded by --exclude {pattern!r}",
                                   excluded=True, within=item.within))
            continue
        fixed = None if forced else selection.fixed_reason(item) or _looks_fixed(index, item)
        if fixed:
            skipped.append(Skipped(item.name, item.op, fixed, left_alone=True,
                                   within=item.within))
            continue
        candidates.append(item)
    layers: list[Layer] = []
    owner: dict[ConstRef, list[Layer]] = {}
    # Readers that are targets themselves (tied ones' chains too). A Loop/Scan node counts for
    # the weights its body layers read, and only for those.
    targets = {j for item in candidates if item.body is None for j in item.own_nodes}
    body_reads = {(item.node_index, ref) for item in candidates if item.body
                  for ref in (item.weight, item.recurrent) if ref is not None}
    # The nodes that apply a layer's weight (a Loop/Scan for its body's layers), all of them.
    target_nodes = {item.node_index for item in recognised}
    for item in candidates:
        refs = item.stored_weights
        earlier = [lay for r in refs for lay in owner.get(r, [])]
        same = next((lay for lay in earlier if _same_use(lay, item)), None)
        if same is not None:
            same.more_uses.extend(item.uses)
            continue
        overlapping = [lay for lay in earlier if not _disjoint(lay, item)]
        if overlapping:
            first = overlapping[0]
            first.shared_weight_users.append(item.name)
            what = "weights" if item.is_recurrent else "weight"
            skipped.append(Skipped(item.name, item.op,
                                   f"{what} tied to layer {first.name}, {_how_else(first, item)} "
                                   "(set at its first use)", left_alone=True,
                                   within=item.within))
            continue
        for r in refs:  # a new weight, or other elements of one (a Slice of a shared kernel)
            owner.setdefault(r, []).append(item)
        layers.append(item)
    kept: list[Layer] = []
    stepped = {u.node_index for lay in layers if lay.more_uses for u in lay.uses}
    for layer in layers:
        layer.disjoint_readers = _disjoint_readers(layer, recognised)
        # (A weight in an If branch has its readers there checked by ``_branch_layers``.)
        users = [j for ref in layer.stored_weights if not ref.scope
                 for j, _ in index.readers_through(ref.name, layer.chain_nodes)[0]
                 if j not in layer.own_nodes and j not in layer.disjoint_readers]
        strangers = sorted({j for j in users if j not in targets
                            and (j, layer.weight) not in body_reads})
        if strangers and not selection.matches(selection.include, _names(layer)):
            who = ", ".join(f"{index.node_name(j)} ({index.graph.node[j].op_type})"
                            for j in strangers)
            skipped.append(Skipped(layer.name, layer.op, (
                f"its weight {layer.weight.name!r} is also read by {who}, which is not a "
                "target (a tie such as an LM head sharing the token embedding): left alone; "
                f"--include {layer.name} initialises it anyway, changing that reader too"),
                left_alone=True, within=layer.within))
            continue
        outer = [r.name for r in layer.stored_weights if not r.scope]
        if layer.branch and outer and read_inside(index, layer.body[0], outer, [layer]) \
                and not selection.matches(selection.include, _names(layer)):
            skipped.append(Skipped(layer.name, layer.op, (
                f"its weight {layer.weight.name!r} (stored outside the If) is also read by "
                f"another node inside {index.node_name(layer.body[0])} (the other branch, a "
                "tied table): left alone; --include it to initialise it anyway, changing "
                "that reader too"), left_alone=True, within=layer.within))
            continue
        for j in users:
            if index.node_name(j) not in layer.shared_weight_users:
                layer.shared_weight_users.append(index.node_name(j))
        if users:
            upstream = index.ancestors(layer.node_index)
            layer.weight_read_upstream = any(j in upstream for j in users)
        if layer.more_uses:  # one use upstream of another: an unrolled recurrence
            roots = [u.node_index for u in layer.uses]
            outputs = {o for r in roots for o in index.graph.node[r].output if o}
            # one walk down from every use (not one up from each: 18 steps of a 6,000-node
            # decoder took seconds)
            below = index.downstream(outputs, set())
            layer.weight_read_upstream |= any(x in below for r in roots for x in index.reads[r])
            inputs = {index.graph.node[r].input[0] for r in roots}
            if _feeds_back(index, roots, outputs, inputs, target_nodes) and \
                    _steps_take_input(index, roots, target_nodes, stepped):
                _as_state_weight(index, layer)
        layer.index = len(kept)
        layer.row = kept[-1].row + len(kept[-1].blocks) if kept else 0
        kept.append(layer)
    names = [n for item in found for n in (
        _names(item) if isinstance(item, Layer) else [item.name, item.op, *item.within])]
    unused = [p for p in (*selection.include, *selection.exclude)
              if not selection.matches([p], names)]
    return Discovery(kept, skipped, unused)


def _feeds_back(index: GraphIndex, nodes: list[int], start: set[str], end: set[str],
                targets: set[int]) -> bool:
    """Whether the weight applied by ``nodes`` multiplies a recurrence's previous state: the
    value one of them reads (its input 0) is computed from ``start``, and ``end`` from what
    one of them computes, by paths through no other target node (``targets``). In a
    Loop/Scan body, ``start`` and ``end`` are one carried state as the body takes it and as
    it returns it; in an unrolled recurrence, the uses' outputs and their inputs: one step's
    use reads what another step's use computed.

    Through no other layer, so that the steps of an unrolled decoder or a stacked cell's
    input weight (whose input comes from the state only through another layer's weight) are
    layers like any other; a cell's own gating (Sigmoid, Mul, Add) is no layer. Nor through
    an index (ArgMax, Shape, ...): a greedy decoder's head, whose argmax picks the next token,
    multiplies no state.
    """
    others = targets - set(nodes)
    # nor through an index (an unrolled greedy decoder's ArgMax -> Gather of the next token)
    blocked = others | set(nodes) | {i for i, n in enumerate(index.graph.node)
                                     if n.op_type in INDEX_OPS}
    reads = {index.graph.node[j].input[0] for j in nodes}
    if not reads & index.downstream(start, blocked):
        return False
    outputs = {o for j in nodes for o in index.graph.node[j].output if o}
    return bool(end & index.downstream(outputs, blocked))


# Where a recurrence combines its state with the step's own input (W x_t + R h).
_JOINS = ("Add", "Sub", "Mul", "Sum", "Concat")


def _steps_take_input(index: GraphIndex, nodes: list[int], targets: set[int],
                      stepped: set[int]) -> bool:
    """Whether the way from one use's output to another use's input takes in, at an Add, Mul
    or Concat, a value computed from the data outside that way that the first use did not
    read already (the step's own input, W x_t; not a residual connection's x), straight from
    the data or through uses of weights applied step by step too (``stepped``: the input
    projection W of an unrolled cell; not a lateral conv applied once, as in an FPN):
    what makes unrolled steps a recurrence, whose state weight gets R's rule. A weight applied
    over and over to its own output with nothing new coming in (a filter bank cascaded over
    octaves, a depth-shared layer) is a cascade: one layer, scaled over its uses pooled."""
    others = targets - set(nodes)
    outputs = {o for j in nodes for o in index.graph.node[j].output if o}
    way = index.downstream(outputs, others | set(nodes))
    above = set().union(*(index.ancestors(j) for j in nodes)) - set(nodes)
    inputs = {t.name for t in index.graph.input} - {t.name for t in index.graph.initializer}
    data = index.downstream(inputs, set())
    first = min(nodes)  # what the first step already read is not new (a residual's x)
    seen = {x for k in index.ancestors(first) | {first} for x in index.graph.node[k].input}
    for k in above:
        node = index.graph.node[k]
        if node.op_type not in _JOINS or not any(o in way for o in node.output):
            continue
        if any(x and x not in way and x not in seen and x in data
               and _nearest_targets(index, x, targets) <= stepped for x in node.input):
            return True
    return False


def _nearest_targets(index: GraphIndex, name: str, targets: set[int]) -> set[int]:
    """The target nodes that ``name`` is computed from through no other target node."""
    found: set[int] = set()
    stack, seen = [name], {name}
    while stack:
        i = index.producer.get(stack.pop())
        if i is None:
            continue
        if i in targets:
            found.add(i)
            continue
        for x in index.reads[i]:
            if x not in seen:
                seen.add(x)
                stack.append(x)
    return found


def _as_gates(layer: Layer) -> None:
    """A fused projection cut in three is a recurrent cell's gates, not attention's q, k, v."""
    if layer.blocks == ("q", "k", "v"):
        layer.blocks = ("p0", "p1", "p2")


def _as_state_weight(index: GraphIndex, layer: Layer) -> None:
    """Give ``layer`` the rule of a weight that multiplies the previous state: never scaled,
    orthonormal per gate. Its gates are the parts of its output that one Split cuts (already
    its blocks), or that Slices cut into equal ranges of the output units (tf2onnx's GRU
    slices its recurrent projection so); otherwise the weight is one matrix."""
    layer.multiplies_state = True
    _as_gates(layer)
    if len(layer.blocks) > 1 or layer.unit_shape is not None:
        return
    node = index.graph.node[layer.node_index]
    rank = layer.output_rank
    if rank is None and all(index.graph.node[j].op_type == "Add" for j in layer.out_nodes):
        rank = _known_rank(index.graph, node.input[0])  # a MatMul keeps its input's rank
    parts = _slice_parts(index, layer.output, layer.layout.output_units, layer.out_axis, rank)
    if parts > 1:
        layer.layout = replace(layer.layout, groups=parts)
        layer.blocks = tuple(f"p{k}" for k in range(parts))


def _known_rank(graph: onnx.GraphProto, name: str) -> int | None:
    """The rank of tensor ``name`` where the graph declares its shape (inputs, value_info)."""
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


_FULL = 2 ** 31 - 1  # an end at or past this takes an axis whole (tf2onnx: INT32_MAX)


def _slice_parts(index: GraphIndex, output: str, units: int, axis: int,
                 rank: int | None) -> int:
    """Parts of ``output`` when every reader is a Slice that keeps every other axis whole
    and takes a range of the units' axis, and the ranges cut the units into equal parts
    (each read by one Slice or more); 0 otherwise."""
    readers = index.consumers.get(output, [])
    if len(readers) < 2 or output in index.graph_outputs:
        return 0
    unit_axis = axis % rank if rank is not None else axis
    ranges = set()
    for i, pos in readers:
        node = index.graph.node[i]
        if node.op_type != "Slice" or node.domain not in _DEFAULT_DOMAIN or pos != 0 or \
                index.opset < 10:
            return 0
        given = (list(node.input[1:5]) + ["", "", "", ""])[:4]
        consts = [index.resolve_const(x) if x else None for x in given]
        if consts[0] is None or consts[1] is None or any(
                x and c is None for x, c in zip(given[2:], consts[2:])):
            return 0
        starts, ends = (index.const_array(c).astype(np.int64).tolist() for c in consts[:2])
        axes = index.const_array(consts[2]).astype(np.int64).tolist() if consts[2] \
            else list(range(len(starts)))
        steps = index.const_array(consts[3]).astype(np.int64).tolist() if consts[3] \
            else [1] * len(starts)
        taken = None
        for a, start, end, step in zip(axes, starts, ends, steps):
            if a < 0 and rank is not None:
                a += rank
            elif a >= 0 and rank is None:
                return 0  # which axis it is cannot be told
            if step != 1:
                return 0
            if a != unit_axis:
                if start != 0 or end < _FULL:
                    return 0
                continue
            start, end = (min(max(v + units if v < 0 else v, 0), units) for v in (start, end))
            taken = (start, end)
        if taken is None or taken[0] >= taken[1]:
            return 0
        ranges.add(taken)
    ordered = sorted(ranges)
    size = ordered[0][1] - ordered[0][0]
    tiles = all(r == (k * size, (k + 1) * size) for k, r in enumerate(ordered))
    return len(ordered) if tiles and len(ordered) * size == units and len(ordered) > 1 else 0


def recurrent_rule(init: str, check: bool = False) -> str:
    """What a recurrent weight got (an LSTM/GRU/RNN op's R, or a weight that multiplies a
    recurrence's previous state), in the same words for both: after Saxe et al., orthonormal
    per gate and not scaled, since scaling it to unit output variance would set the
    recurrence's gain (its spectral radius) instead. ``check``: what ``--check`` says of it."""
    if check:
        return "recurrent (multiplies the previous state): its variance is not judged"
    if init == "rescale":
        return "recurrent: kept as it is, not scaled"
    if init in BASELINES:
        return f"recurrent: {init} draw, not scaled"
    return "recurrent: orthonormal per gate, not scaled"


def read_inside(index: GraphIndex, j: int, names: list[str], layers: list[Layer]) -> bool:
    """Whether node ``j`` with subgraphs (an If, Loop or Scan holding ``layers``, so counted
    as theirs where it reads ``names``) also reads them (or an Identity of them: torch's
    deduplication) inside by another node than those layers': the other branch's layer
    reading a weight or bias torch stored once for both, a Gather of a tied table."""
    seen, stack = set(), list(names)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(index.graph.node[i].output[0] for i, pos in index.consumers.get(n, [])
                         if index.graph.node[i].op_type == "Identity" and pos == 0)
    # each layer inside j: the path of (node, subgraph) down to it, and its nodes there
    inside = [(lay.branch or ((j, "body"),), lay.local_nodes) for lay in layers
              if lay.body is not None and lay.body[0] == j]
    return _read_by_others(index.graph.node[j], seen, inside)


def _read_by_others(node: onnx.NodeProto, names: set[str],
                    inside: list[tuple[tuple, set[int]]]) -> bool:
    """Whether a node of ``node``'s subgraphs reads ``names`` that is none of the layers'
    ``inside`` (path, nodes), going down nested Ifs along the layers' paths."""
    for a in node.attribute:
        if a.type != onnx.AttributeProto.GRAPH:
            continue
        free = names - {t.name for t in a.g.initializer} - {i.name for i in a.g.input}
        here = [(path[1:], nodes) for path, nodes in inside if path[0][1] == a.name]
        for k, inner in enumerate(a.g.node):
            if not free & ({x for x in inner.input if x} | outer_reads(inner)):
                continue
            if any(not path and k in nodes for path, nodes in here):
                continue  # a node of one of the layers
            deeper = [(path, nodes) for path, nodes in here if path and path[0][0] == k]
            if not deeper or _read_by_others(inner, free, deeper):
                return True
    return False


def _same_gather(a: WeightChain | None, b: WeightChain | None) -> bool:
    """Whether two chains (or none) read the same elements of their constant, in order."""
    if a is None or b is None:
        return a is b
    return np.array_equal(a.source, b.source)


def _same_use(first: Layer, other: Layer) -> bool:
    """Whether ``other`` applies ``first``'s weight the same way (so they are one layer): same
    op, layout, blocks and chain, the same bias through the same chain (or none), no
    recurrent weight, neither inside a Loop/Scan body (measured through its own node)."""
    if first.is_recurrent or other.is_recurrent or first.op != other.op:
        return False
    if first.body is not None or other.body is not None:
        return False
    if (first.layout, first.blocks, first.dtype, first.bias, first.bias_scale) != \
            (other.layout, other.blocks, other.dtype, other.bias, other.bias_scale):
        return False
    return _same_gather(first.chain, other.chain) and \
        _same_gather(first.bias_chain, other.bias_chain)


def _disjoint_readers(layer: Layer, recognised: list[Layer]) -> set[int]:
    """The nodes of other layers (excluded ones too) that read elements of ``layer``'s stored
    weight disjoint from its own, as their chains' gathers say: rescaling ``layer`` leaves
    what they read alone, so they are no tied readers of it. Every node of such a layer's
    uses counts, not only its chain's first one: two layers reading the halves of one kernel
    through one Split share that node, and a walk from the weight through it reaches the
    other layer's chain and node. The nodes the layer has itself (the shared Split) stay
    its own."""
    own = layer.own_nodes
    return {j for other in recognised
            if other is not layer and other.weight == layer.weight and other.body is None
            and not other.own_nodes <= own  # one of its own uses (18 in a decoder)
            and _disjoint(layer, other)
            for j in other.own_nodes} - own


def _how_else(first: Layer, other: Layer) -> str:
    """How ``other`` applies ``first``'s weight otherwise (why they are not one layer)."""
    if first.is_recurrent or other.is_recurrent:
        return "read by a recurrent op"
    if first.branch or other.branch:
        return "read inside an If branch"
    if first.body is not None or other.body is not None:
        return "read inside a Loop/Scan body"
    if (first.op, first.layout, first.blocks, first.dtype) != \
            (other.op, other.layout, other.blocks, other.dtype) or \
            not _same_gather(first.chain, other.chain):
        return "read in another layout"
    return "applied with another bias"


def _disjoint(a: Layer, b: Layer) -> bool:
    """Whether two layers read disjoint elements of one stored weight (through Slices)."""
    if a.chain is None or b.chain is None or a.recurrent is not None or b.recurrent is not None:
        return False
    return not np.intersect1d(a.chain.source, b.chain.source).size


# Below 2^(mantissa bits - 3) the spacing of a float type's values is at most 1/16, so a value
# that is not hand-set lands on an integer with a chance of at most 1/16: there an integer value
# is evidence. From 2^mantissa bits on every value the type holds is an integer (float32:
# 2^23, float16: 2^10, bfloat16: 2^7), and just below that half or a quarter of them are.
# The thresholds: float32 2^20 (about 1e6), float16 2^7 = 128, bfloat16 2^4 = 16 (YOLOv8's
# DFL kernel, 0..15, is below each), float64 2^49.
_INTEGER_EVIDENCE_BITS = 4


def _integer_range(dtype: np.dtype) -> float:
    """The magnitude below which a stored value being an integer says something (see
    ``_INTEGER_EVIDENCE_BITS``)."""
    return 2.0 ** (np.finfo(dtype).nmant + 1 - _INTEGER_EVIDENCE_BITS)


def _looks_fixed(index: GraphIndex, layer: Layer) -> str | None:
    """A reason when the stored weight looks hand-set rather than trained: every value an
    integer, with at least three distinct values, all of magnitude below the stored dtype's
    ``_integer_range`` (YOLOv8's DFL conv holds 0..15; an identity or 0/1 mask is not caught;
    a kernel of large random values is integer-valued only because its dtype holds nothing
    else there), or every value the same non-zero number (an averaging kernel)."""
    if layer.is_recurrent:
        return None
    w = index.const_array(layer.weight)
    if w.size < 2:
        return None
    head = w.reshape(-1)[:4096].astype(np.float64)  # a trained or random weight: seen here
    if np.any(head != np.round(head)) and np.any(head != head[0]):
        return None
    flat = w.reshape(-1).astype(np.float64)
    if not np.all(np.isfinite(flat)):
        return None
    lo, hi = float(flat.min()), float(flat.max())
    integer = bool(np.all(flat == np.round(flat))) and \
        max(-lo, hi) < _integer_range(w.dtype)
    if integer and len(np.unique(flat)) >= 3:
        what = f"every value an integer, {lo:g} to {hi:g}"
    elif lo == hi and lo != 0:
        what = f"every value {lo:g}"
    else:
        return None
    return (f"its weight {layer.weight.name!r} looks hand-set, not trained ({what}), like "
            "YOLOv8's fixed DFL conv: left alone; --include "
            f"{layer.name} initialises it anyway")


# Ops that only move the output units between axes; a bias Add may follow them.
_SHAPE_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")


def _following_bias(index: GraphIndex, i: int, units: int, axis: int,
                    rank: int | None, tail: tuple[int, ...] | None = None) -> dict:
    """The bias Add after node ``i`` (through shape-only ops) whose constant has one value per
    output unit on the output-unit axis (or on the last axes, of shape ``tail``), as Layer
    fields; none when there is none."""
    out = index.graph.node[i].output[0]
    walked: list[int] = []
    where = _Units(axis, rank, tail)
    while True:
        users = index.consumers.get(out, [])
        if len(users) != 1 or out in index.graph_outputs or users[0][1] == OUTER_SCOPE:
            return {}
        j, pos = users[0]
        node = index.graph.node[j]
        if node.domain not in _DEFAULT_DOMAIN:
            return {}
        if node.op_type == "Add":
            found = _bias_const(index, node.input[1 - pos])
            if found is None:
                return {}
            ref, chain = found
            shape = chain.shape if chain else tuple(int(d) for d in index.weight_proto(ref).dims)
            if not _lines_up(shape, units, where):
                return {}
            walked.append(j)
            return dict(bias=ref, bias_chain=chain, bias_input=(j, 1 - pos),
                        output=node.output[0], output_rank=where.rank, out_axis=where.axis,
                        unit_shape=where.tail, out_nodes=tuple(walked))
        if node.op_type not in _SHAPE_OPS or pos != 0 or where.tail is not None:
            return {}
        where = _move_axis(index, node, where, units)
        if where is None:
            return {}
        walked.append(j)
        out = node.output[0]


@dataclass(frozen=True)
class _Units:
    """Where the output units are: one axis (from the front when the rank is known, else from
    the end), or the trailing axes of shape ``tail``."""

    axis: int
    rank: int | None
    tail: tuple[int, ...] | None


def _lines_up(shape: tuple[int, ...], units: int, where: _Units) -> bool:
    """Whether a constant of ``shape`` added to the output is one value per output unit."""
    shape = list(shape)
    if int(np.prod(shape)) != units:
        return False
    if where.rank is not None and len(shape) > where.rank:
        return False
    if where.tail is not None:
        k = len(where.tail)
        return len(shape) >= k and tuple(shape[-k:]) == where.tail
    if not shape:
        return units == 1
    from_end = where.axis - where.rank if where.rank is not None and where.axis >= 0 \
        else where.axis
    if -from_end > len(shape):
        return units == 1
    return shape[from_end] == units


def _shape_entries(index: GraphIndex, name: str) -> tuple[list[int], bool] | None:
    """The known trailing entries of a Reshape's shape input, and whether they are all of it:
    a constant, or a Concat (axis 0) whose last inputs are constants (tf2onnx and jax2onnx
    build [batch..., units] from Shape slices and a constant tail)."""
    ref = index.resolve_const(name)
    if ref is not None:
        return index.const_array(ref).astype(np.int64).reshape(-1).tolist(), True
    j = index.producer.get(name)
    while j is not None and index.graph.node[j].op_type == "Cast":  # tf2onnx: int32 -> int64
        j = index.producer.get(index.graph.node[j].input[0])
    if j is None:
        return None
    node = index.graph.node[j]
    if node.op_type != "Concat" or int(attribute(node, "axis", 0)) != 0:
        return None
    tail: list[int] = []
    for part in reversed(list(node.input)):
        ref = index.resolve_const(part)
        if ref is None:
            break
        tail = index.const_array(ref).astype(np.int64).reshape(-1).tolist() + tail
    return (tail, False) if tail else None


def _move_axis(index: GraphIndex, node: onnx.NodeProto, where: _Units,
               units: int) -> _Units | None:
    """Where the output units are after a shape-only op, or None when it cannot be told."""
    op, axis, rank = node.op_type, where.axis, where.rank
    if op == "Identity":
        return where
    if op == "Transpose":
        perm = attribute(node, "perm", None)
        if perm is None:
            return None
        rank = len(perm) if rank is None else rank
        return _Units(list(perm).index(axis % rank), rank, None)
    if op in ("Squeeze", "Unsqueeze"):
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            ref = index.resolve_const(node.input[1])
            axes = index.const_array(ref).tolist() if ref is not None else None
        if axes is None or rank is None:
            return None
        if op == "Squeeze":
            axes = {a % rank for a in axes}
            if axis % rank in axes:
                return None
            return _Units(axis % rank - sum(a < axis % rank for a in axes), rank - len(axes),
                          None)
        new_rank = rank + len(axes)
        inserted = {a % new_rank for a in axes}
        kept = [k for k in range(new_rank) if k not in inserted]
        return _Units(kept[axis % rank], new_rank, None)
    if op == "Reshape":
        entries = _shape_entries(index, node.input[1]) if len(node.input) > 1 else None
        if entries is None:
            return None
        shape, complete = entries
        new_rank = len(shape) if complete else None
        last = axis == -1 or (rank is not None and axis == rank - 1)
        if last and shape[-1] == units:
            return _Units(len(shape) - 1 if complete else -1, new_rank, None)
        if last:  # the units spread over the last axes: [..., heads, head_dim]
            for k in range(2, len(shape) + 1):
                tail = shape[-k:]
                if min(tail) <= 0:
                    break
                if int(np.prod(tail)) == units:
                    return _Units(-1, new_rank, tuple(tail))
            return None
        if complete and rank is not None and axis == 1 and len(shape) > 1 and \
                shape[1] == units and shape[0] == 0:  # the batch axis copied: units stay
            return _Units(1, len(shape), None)
    return None


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


def _count_targets(nodes, functions: dict[tuple[str, str], onnx.FunctionProto],
                   seen: frozenset = frozenset()) -> int:
    """Target ops among ``nodes``, in their subgraphs and in the functions they call."""
    count = 0
    for n in nodes:
        key = (n.domain, n.op_type)
        if key in functions and key not in seen:
            count += _count_targets(functions[key].node, functions, seen | {key})
        elif n.op_type in TARGET_OPS or n.op_type in RNN_OPS:
            count += 1
        else:
            count += _count_subgraph_targets(n)
    return count


def _count_subgraph_targets(node: onnx.NodeProto) -> int:
    """Target ops inside ``node``'s subgraphs (If branches, Loop/Scan bodies), nested ones too."""
    return sum(_count_targets(g.node, {}) for g in subgraphs(node))
