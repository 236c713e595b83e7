"""Transformer roles of target layers, read from the graph's data flow (``find_roles``).

``--policy transformer`` sets some layers by what they do in a transformer rather than by the
paper's unit variance at their own output (see ``policy``). Which layer does what is found
from the graph alone, by the same walk for every exporter, with no names matched:

* **attention**: from each Softmax back, past a mask (an Add, Sub or Where whose other input
  no target layer computes), to the *logits* (the scaled q.k^T); from there through
  Mul/Div/Cast to the MatMul of q and k^T, and from each of its inputs back through layout ops
  (Transpose, Reshape, Squeeze, Unsqueeze, Gather/Split/Slice of one piece, Mul/Div by a
  scale) to the target layer that computes it: the q and k layers (one fused layer feeding
  both: ``qkv``, whose q and k units are read from the ops that cut it, and proven, or the
  layer gets no role and a note: ``_Walker._piece``). A Softmax in a residual branch that
  no attention is recognised from leaves its block without roles, with a note
  (``find_roles``). From the Softmax forward through the MatMul with v to the v layer (back
  from its other input) and to the first target layers that read the result: the
  out-projection.
* **residual Adds**: an Add of two computed tensors, one of which (the *branch*) comes
  straight (through layout ops, Dropout, or a Mul by a constant such as LayerScale) from a
  target layer, the branch's *last layer*, whose own input depends on the other (the
  *stream*). The target layers between the stream and the branch input are the branch's
  layers: an attention branch (it holds a Softmax found above; its last layer is
  ``attn_out``) or an MLP (the last layer ``mlp_out``, the others ``mlp_in``). An attention
  branch starts a block; the MLP branch after it belongs to the same block.
* **pre-LN or post-LN**: a block is pre-LN when its branch reads the stream through a
  LayerNormalization (or the first op of its decomposed form, a ReduceMean or Pow), post-LN
  when the residual Add's output goes into one.
* **the stream writer** (``embedding``): the target layer whose output reaches the first
  residual Add's stream without passing another target layer (a patch embedding); where no
  target layer does, the one Gather that reads a constant float table with indices computed
  from a graph input (a token embedding), whose table is then scaled: not a table that
  another node also reads (a head tied to it). Not where a
  normalisation lies on the way (the stream's scale is the norm's, not the writer's).
* **the head**: a target layer after the last residual Add whose output reaches a graph
  output without passing another target layer.

A model without a recognised attention gets no roles: the rules are for transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from .graph import GraphIndex
from .layers import Layer

log = logging.getLogger("onnx_lsuv")

KINDS = ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out", "embedding", "head")
PRE, POST = "pre", "post"

# Ops that move or pick the elements of one tensor (the data input, the first; the others are
# shapes, axes, indices), which a walk from an attention back to its projections passes.
LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast",
              "Dropout", "Expand", "Gather", "Split", "Slice", "Contiguous"}
# Ops that scale by a tensor no target computes (q / sqrt(d), LayerScale): passed too.
SCALE_OPS = {"Mul", "Div"}
# Ops that mask the logits before the Softmax (an additive mask, a masked fill).
MASK_OPS = {"Add", "Sub", "Where"}
# Ops that start a layer normalisation, fused or decomposed (LayerNorm: ReduceMean; RMSNorm:
# Pow or ReduceMean of the square).
NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "RMSNormalization", "ReduceMean", "Pow",
            "GlobalAveragePool"}  # tf2onnx's LayerNorm: its means over the last axis of [B,T,D]
# Attention computed inside one node (ONNX Runtime's transformer optimiser, opset 23): the
# logits are not a tensor of the graph. com.microsoft Attention holds the q/k/v projection
# itself (its weight input); MultiHeadAttention and ONNX's Attention read projected q, k, v.
FUSED_ATTENTION = {("com.microsoft", "Attention"): False,
                   ("com.microsoft", "MultiHeadAttention"): True, ("", "Attention"): True}
# The logits of a fused attention node, computed from its q and k inputs on measuring copies
# (``add_fused_logits``): the name is this prefix and the node's (first) output's name.
FUSED_LOGITS = "onnx_lsuv::logits_of:"


@dataclass(frozen=True)
class Role:
    """What one target layer does in a transformer, and where its policy measures.

    Attributes:
        kind: One of ``KINDS``: "q", "k", "v" (the attention's projections), "qkv" (one layer
            computing q, k and v), "attn_out" (the attention's out-projection, the last
            layer of its residual branch), "mlp_in" (an MLP's layer before its last),
            "mlp_out" (the MLP's last layer), "embedding" (the layer that writes the
            residual stream), "head" (the last layer before a graph output).
        block: The transformer block (0-based, in graph order), None for embedding and head.
        n_blocks: How many blocks the model has (attention branches, MLP-only blocks
            counted apart; a branch with an attention that was not recognised counts as
            one, its layers without a role).
        norm: "pre" or "post" (where the block's LayerNorm sits), None where none was found
            or for embedding and head.
        logits: q, k, qkv: the attention logits this layer's scale moves (the Softmax input
            before any mask), one tensor per attention.
        stream: attn_out, mlp_out: the residual Add's stream input; embedding: the stream
            after the embedding (the first residual Add's stream input).
        branch: attn_out, mlp_out: the residual Add's branch input (this layer's output, up
            to layout ops and a constant scale).
        residual: attn_out, mlp_out: the residual Add's output.
        parts: qkv: the pieces of the output units in order, e.g. ("q", "k", "v").
        qk_units: qkv: the output units that are q's and k's (sorted), read from the ops
            that cut the layer's output (``_Walker._piece``): the units scaled for the
            logits; v's are not among them.
        table: embedding read by a Gather: the table (an initializer) that is scaled.
        fused: q, k, v of an attention computed inside one node (``FUSED_ATTENTION``): that
            node's name; its logits are no tensor of the graph, so ``logits`` is empty.
    """

    kind: str
    block: int | None = None
    n_blocks: int = 0
    norm: str | None = None
    logits: tuple[str, ...] = ()
    stream: str | None = None
    branch: str | None = None
    residual: str | None = None
    parts: tuple[str, ...] = ()
    qk_units: tuple[int, ...] = ()
    table: str | None = None
    fused: str | None = None


@dataclass
class Attention:
    """One attention found from its Softmax."""

    softmax: int  # node index
    logits: str
    q: tuple[int, Piece] | None  # (layer index, its units picked: ``_Walker._piece``)
    k: tuple[int, Piece] | None
    v: tuple[int, Piece] | None
    out: list[int]  # layer indices reading the attention's result
    fused: str = ""  # the fused attention node computing the logits inside, if any


@dataclass
class Residual:
    """One residual Add: ``add`` = stream + branch, the branch ending in layer ``last``."""

    node: int
    stream: str
    branch: str
    last: int
    layers: list[int]  # the branch's target layers, topological
    attention: bool = False
    norm: str | None = None
    block: int = 0
    nodes: frozenset[int] = frozenset()  # the branch's nodes (after the stream)
    unknown: bool = False  # an attention-like branch no attention was recognised in


PIECES = ("q", "k", "v")
# The units of a layer's output that a walk from an attention reaches (``_Walker._piece``):
# () for all of them, the sorted unit indices of a proven piece, or UNPROVEN.
Piece = tuple[int, ...] | str
UNPROVEN = "?"


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    a = next((a for a in node.attribute if a.name == name), None)
    return None if a is None else [int(x) for x in a.ints]


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else int(a.i)


class _Walker:
    """The graph, its target layers and which tensors a target layer computes."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer]) -> None:
        self.graph = model.graph
        self.model = model
        self.index = GraphIndex(model.graph)
        self.layers = [lay for lay in layers if lay.body is None and not lay.branch]
        self.by_output = {lay.output: lay for lay in self.layers}
        self.layer_nodes = {lay.node_index for lay in self.layers}
        # (a Shape reads no values: what is computed from a shape is no layer's signal)
        shapes = {i for i, n in enumerate(self.graph.node) if n.op_type in ("Shape", "Size")}
        self.tainted = self.index.downstream({lay.output for lay in self.layers}, shapes)
        self._ranks: dict[str, int] | None = None
        self._dims: dict[str, list[int]] | None = None

    def node(self, name: str) -> onnx.NodeProto | None:
        i = self.index.producer.get(name)
        return None if i is None else self.graph.node[i]

    def computed(self, names) -> list[str]:
        """The ones of ``names`` that a target layer computes (directly or downstream)."""
        return [n for n in names if n and n in self.tainted]

    def source(self, name: str, scales: bool = True) -> tuple[int, Piece] | None:
        """The target layer that ``name`` is (up to layout ops, and with ``scales`` a scale by
        a tensor no target computes), and the piece of its output units picked on the way
        (``_piece``); None where another op is on the way."""
        seen = set()
        chain: list[tuple[onnx.NodeProto, str, str]] = []  # (node, data input, output)
        while name not in self.by_output:
            if name in seen:
                return None
            seen.add(name)
            i = self.index.producer.get(name)
            if i is None:
                return None
            node = self.graph.node[i]
            ops = LAYOUT_OPS | (SCALE_OPS if scales else set())
            if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
                return None
            data = self.computed(node.input)
            if len(data) != 1:
                return None
            if node.op_type not in SCALE_OPS and node.input[0] != data[0]:
                return None  # the data is the index, the shape: not its values
            if node.op_type == "Div" and node.input[0] != data[0]:
                return None  # the divisor
            chain.append((node, data[0], name))
            name = data[0]
        lay = self.by_output[name]
        return lay.index, self._piece(lay, chain[::-1])

    def _piece(self, lay: Layer, chain: list[tuple[onnx.NodeProto, str, str]]) -> Piece:
        """The output units of ``lay`` that the end of ``chain`` (the ops from its output on)
        holds: () for all of them (nothing picked), the sorted unit indices where one
        Gather of a constant index, one output of a Split or one Slice picks a piece of an
        axis that is proven a factor of the layer's unit axis (the axes followed forward
        through Reshapes of constant shape, Transposes, Squeezes and Unsqueezes: a Reshape's
        trailing dims whose product is the unit count are the unit axis in row-major order,
        so a per-head layout, [q|k|v] inside each head, gets its interleaved units); "?"
        where a piece is picked whose units this cannot prove (``UNPROVEN``)."""
        picks = [n for n, _, _ in chain if n.op_type in ("Gather", "Split", "Slice")]
        if not picks:
            return ()
        units = lay.layout.output_units
        rank = lay.output_rank if lay.output_rank is not None else \
            self._rank_of(lay.output)
        if rank is None or lay.out_axis not in (-1, rank - 1) or len(picks) > 1:
            return UNPROVEN
        # per axis: None (not a unit axis) or (stride, size) of the unit index
        axes: list[tuple[int, int] | None] = [None] * (rank - 1) + [(1, units)]
        for node, _, out in chain:
            op = node.op_type
            if op in ("Identity", "Cast", "Dropout", "Contiguous") or op in SCALE_OPS:
                continue
            if op == "Reshape":
                axes = self._reshaped(axes, node, units)
            elif op == "Transpose":
                perm = _ints(node, "perm")
                axes = [axes[p] for p in perm] if perm and len(perm) == len(axes) else None
            elif op in ("Squeeze", "Unsqueeze"):
                axes = self._squeezed(axes, node)
            elif op in ("Gather", "Split", "Slice"):
                return self._picked(axes, node, out, units)
            else:
                return UNPROVEN
            if axes is None:
                return UNPROVEN
        return UNPROVEN

    def _reshaped(self, axes, node: onnx.NodeProto, units: int):
        """The axes after a Reshape of constant shape: the unit axis must be whole and last
        before it, and the new shape's trailing dims must multiply to the unit count."""
        unit_axes = [a for a in axes if a is not None]
        if unit_axes != [(1, units)] or axes[-1] != (1, units):
            return None
        shape = self._const(node.input[1])
        if shape is None:  # computed from Shape ops (torch's unflatten): evaluated
            shape = self._shape_value(node.input[1])
        dims = [int(x) for x in shape.reshape(-1)] if shape is not None else \
            self._dims_of(node.output[0])
        if dims is None:
            return None
        prod = 1
        for q in range(len(dims) - 1, -1, -1):
            if dims[q] <= 0:
                return None
            prod *= dims[q]
            if prod == units:
                out: list[tuple[int, int] | None] = [None] * q
                stride = units
                for d in dims[q:]:
                    stride //= d
                    out.append((stride, d))
                return out
            if prod > units:
                return None
        return None

    def _squeezed(self, axes, node: onnx.NodeProto):
        """The axes after a Squeeze or Unsqueeze of constant axes (a unit axis squeezed only
        where its size is 1)."""
        given = _ints(node, "axes")
        if given is None and len(node.input) > 1 and node.input[1]:
            c = self._const(node.input[1])
            given = None if c is None else [int(x) for x in c.reshape(-1)]
        if given is None:
            return None
        if node.op_type == "Unsqueeze":
            n = len(axes) + len(given)
            out = list(axes)
            for a in sorted(x % n for x in given):
                out.insert(a, None)
            return out
        drop = {x % len(axes) for x in given}
        if any(axes[a] is not None and axes[a][1] != 1 for a in drop):
            return None
        return [a for k, a in enumerate(axes) if k not in drop]

    def _picked(self, axes, node: onnx.NodeProto, out: str, units: int) -> Piece:
        """The units a Gather (constant scalar index), a Split's output or a Slice (one
        axis, constant starts and ends, step 1) picks on a unit factor axis."""
        op = node.op_type
        if op == "Slice":
            inputs = list(node.input) + [""] * (5 - len(node.input))
            starts, ends, ax, steps = (self._const(x) if x else None for x in inputs[1:5])
            if starts is None or ends is None or starts.size != 1 or ends.size != 1 or \
                    (steps is not None and int(steps.reshape(-1)[0]) != 1):
                return UNPROVEN
            axis = int(ax.reshape(-1)[0]) if ax is not None else 0
        else:
            axis = _int(node, "axis", 0)
        if not -len(axes) <= axis < len(axes):
            return UNPROVEN
        factor = axes[axis]
        if factor is None:
            return ()  # a piece of a non-unit axis (a token, a batch): every unit
        stride, size = factor
        if op == "Gather":
            idx = self._const(node.input[1])
            if idx is None or idx.size != 1 or idx.ndim != 0:
                return UNPROVEN
            lo = int(idx.reshape(-1)[0]) % size
            hi = lo + 1
        elif op == "Split":
            sizes = self._split_sizes(node, size)
            if sizes is None:
                return UNPROVEN
            pos = list(node.output).index(out)
            lo = sum(sizes[:pos])
            hi = lo + sizes[pos]
        else:
            lo = int(starts.reshape(-1)[0])
            hi = int(ends.reshape(-1)[0])
            lo, hi = (x + size if x < 0 else x for x in (lo, hi))
            lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
            if hi <= lo:
                return UNPROVEN
        coord = (np.arange(units) // stride) % size
        return tuple(int(u) for u in np.flatnonzero((coord >= lo) & (coord < hi)))

    def _split_sizes(self, node: onnx.NodeProto, size: int) -> list[int] | None:
        """A Split's sizes along its axis: its ``split`` input or attribute, else equal parts
        (opset 18's ``num_outputs``: the last part the smaller)."""
        sizes = _ints(node, "split")
        if sizes is None and len(node.input) > 1 and node.input[1]:
            c = self._const(node.input[1])
            sizes = None if c is None else [int(x) for x in c.reshape(-1)]
        if sizes is None:
            n = len(node.output)
            each = -(-size // n)
            sizes = [min(each, size - k * each) for k in range(n)]
        return sizes if sum(sizes) == size and len(sizes) == len(node.output) else None

    def _rank_of(self, name: str) -> int | None:
        if self._ranks is None:
            self._ranks = _ranks(self.model)
        return self._ranks.get(name)

    def _shape_value(self, name: str) -> np.ndarray | None:
        """The value of a shape tensor computed only from constants and the Shape of tensors
        whose shapes inference finds fixed (evaluated here by ONNX's reference evaluator);
        None where it reads anything else."""
        from onnx import helper, numpy_helper
        from onnx.reference import ReferenceEvaluator

        nodes, inits, stack, seen = {}, {}, [name], set()
        while stack:
            n = stack.pop()
            if n in seen or not n:
                continue
            seen.add(n)
            if n in self.index.initializers:
                inits[n] = self.index.initializers[n]
                continue
            j = self.index.producer.get(n)
            if j is None or len(nodes) > 64:
                return None
            node = self.graph.node[j]
            if node.op_type == "Shape":
                dims = self._dims_of(node.input[0])
                if dims is None or min(dims, default=0) < 0:
                    return None
                lo, hi = _int(node, "start", 0), _int(node, "end", len(dims))
                value = np.array(dims[lo:hi] if hi else dims[lo:], np.int64)
                nodes[j] = helper.make_node("Constant", [], [n],
                                            value=numpy_helper.from_array(value))
                continue
            nodes[j] = node
            stack.extend(node.input)
        try:
            graph = helper.make_graph([nodes[j] for j in sorted(nodes)], "shape", [],
                                      [helper.make_empty_tensor_value_info(name)],
                                      list(inits.values()))
            model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
        except Exception:  # noqa: BLE001 - not evaluable: unproven
            return None

    def _dims_of(self, name: str) -> list[int] | None:
        """The static shape shape inference finds for ``name``, None where a dim is unknown."""
        if self._dims is None:
            self._dims = _static_dims(self.model)
        return self._dims.get(name)

    def _const(self, name: str) -> np.ndarray | None:
        ref = self.index.resolve_const(name)
        return None if ref is None else self.index.const_array(ref)

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return [self.graph.node[i] for i, _ in self.index.consumers.get(name, [])]


def _attention(w: _Walker, i: int) -> Attention | None:
    """The attention whose Softmax is node ``i``, or None where the walk fails."""
    node = w.graph.node[i]
    logits = node.input[0]
    while (p := w.node(logits)) is not None and p.op_type in MASK_OPS \
            and len(w.computed(p.input)) == 1:
        logits = w.computed(p.input)[0]  # past the mask
    mm = w.node(_scores(w, logits))
    if mm is None or mm.op_type != "MatMul" or len(w.computed(mm.input)) != 2:
        return None
    q, k = w.source(mm.input[0]), w.source(mm.input[1])
    v, out = None, []
    for reader, probs in _prob_readers(w, node.output[0]):
        if reader.op_type == "MatMul" and reader.input[0] == probs:
            v = w.source(reader.input[1])
            out = _first_layers(w, reader.output[0])
    return Attention(i, logits, q, k, v, out)


def _scores(w: _Walker, logits: str) -> str:
    """From the logits back past scales, Casts and layout ops (tf2onnx's Einsum written as
    Reshape -> MatMul -> Reshape -> Squeeze) to the q.k^T product's tensor."""
    name = logits
    while (p := w.node(name)) is not None and p.op_type in SCALE_OPS | LAYOUT_OPS \
            and len(w.computed(p.input)) == 1 and \
            (p.op_type in SCALE_OPS or p.input[0] == w.computed(p.input)[0]):
        name = w.computed(p.input)[0]
    return name


def _prob_readers(w: _Walker, probs: str) -> list[tuple[onnx.NodeProto, str]]:
    """The nodes that read the attention probabilities, through layout ops (tf2onnx:
    Unsqueeze -> Reshape before the MatMul with v), with the tensor each reads."""
    found, stack, seen = [], [probs], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for reader in w.readers(n):
            if reader.op_type in LAYOUT_OPS - {"Gather", "Split", "Slice"} \
                    and reader.input[0] == n:
                stack.extend(o for o in reader.output if o)
            else:
                found.append((reader, n))
    return found


def _fused_attentions(w: _Walker) -> list[Attention]:
    """Attention nodes that compute the logits inside (``FUSED_ATTENTION``): their q, k, v
    layers where the node reads projected q, k and v (its first three inputs), and the layers
    reading its output. No logits: a q/k role from one of them has none to measure."""
    found, ranks = [], None
    for i, node in enumerate(w.graph.node):
        reads_qkv = FUSED_ATTENTION.get((node.domain if node.domain != "ai.onnx" else "",
                                         node.op_type))
        if reads_qkv is None:
            continue
        ranks = _ranks(w.model) if ranks is None else ranks
        q = k = v = None
        if reads_qkv and len(node.input) >= 3 and all(node.input[:3]):
            q, k, v = (w.source(x) for x in node.input[:3])
        logits = FUSED_LOGITS + node.output[0] if _logits_computable(w, node, ranks) else ""
        found.append(Attention(i, logits, q, k, v, _first_layers(w, node.output[0]),
                               w.index.node_name(i)))
    return found


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor shape inference finds (a fused attention's q and k)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no ranks: no fused logits, reported as such
        return {}
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + \
        list(inferred.graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values
            if v.type.tensor_type.HasField("shape")}


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The shape of every tensor that shape inference (with the shapes' values propagated:
    torch's unflatten computes a Reshape's target from Shape) finds, -1 for a dim it does not
    know (a dynamic batch)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes: a Reshape it would prove stays unproven
        return {}
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = [int(d.dim_value) if d.HasField("dim_value") else -1
                           for d in t.shape.dim]
    return out


def _heads(node: onnx.NodeProto) -> int:
    name = "num_heads" if node.domain == "com.microsoft" else "q_num_heads"
    return next((int(a.i) for a in node.attribute if a.name == name), 0)


def _logits_computable(w: _Walker, node: onnx.NodeProto, ranks: dict[str, int]) -> bool:
    """Whether ``add_fused_logits`` can write this node's logits: a com.microsoft
    MultiHeadAttention reading separate q and k of rank 3 ([batch, tokens, hidden], or not
    known) and, if
    any, a constant bias; ONNX's Attention reading q and k both of rank 3 (with as many
    key as query heads) or both of rank 4 ([batch, heads, tokens, head size]), without past
    keys or a softcap."""
    if not node.output[0] or len(node.input) < 3 or not all(node.input[:3]):
        return False
    rank = {ranks.get(node.input[0]), ranks.get(node.input[1])}
    attrs = {a.name: a for a in node.attribute}
    if node.domain == "com.microsoft" and node.op_type == "MultiHeadAttention":
        # (shape inference stops at the first contrib op: an unknown rank is taken as 3,
        # the form ONNX Runtime's optimiser writes; another would fail loudly when measured)
        return rank <= {3, None} and _heads(node) > 0 and (
            len(node.input) < 4 or not node.input[3]
            or w.index.resolve_const(node.input[3]) is not None)
    if node.domain in ("", "ai.onnx") and node.op_type == "Attention":
        if len(node.input) > 4 and node.input[4] or attrs.get("softcap", None) is not None \
                and attrs["softcap"].f:
            return False
        same = "kv_num_heads" not in attrs or attrs["kv_num_heads"].i == _heads(node)
        return rank == {4} or rank == {3} and _heads(node) > 0 and same
    return False


def add_fused_logits(model: onnx.ModelProto, name: str) -> None:
    """On a measuring copy, append the nodes that compute tensor ``name`` (``FUSED_LOGITS``
    + the name of a node ``_logits_computable`` accepted): that node's logits before its
    mask, as it computes them inside: per head, (q + b_q) (k + b_k)^T times its ``scale``
    (default 1 / sqrt(head size)), from its own q, k (and MultiHeadAttention's bias)
    inputs."""
    from onnx import helper, numpy_helper

    node = next(n for n in model.graph.node if n.output[0] == name[len(FUSED_LOGITS):])
    scale = next((a.f for a in node.attribute if a.name == "scale" and a.f), None)
    q, k = node.input[0], node.input[1]
    prefix = name + "/"
    new = []
    if node.domain == "com.microsoft" and len(node.input) > 3 and node.input[3]:
        parts = [prefix + "bq", prefix + "bk", prefix + "bv"]
        new.append(helper.make_node("Split", [node.input[3]], parts, axis=0, num_outputs=3)
                   if _opset(model) >= 18 else
                   helper.make_node("Split", [node.input[3]], parts, axis=0))
        new.append(helper.make_node("Add", [q, parts[0]], [prefix + "q"]))
        new.append(helper.make_node("Add", [k, parts[1]], [prefix + "k"]))
        q, k = prefix + "q", prefix + "k"
    if _ranks(model).get(node.input[0]) == 4:  # already [batch, heads, tokens, head size]
        new.append(helper.make_node("Identity", [q], [q + "/t"]))
        new.append(helper.make_node("Transpose", [k], [k + "/t"], perm=[0, 1, 3, 2]))
        q_heads = q
    else:
        shape = numpy_helper.from_array(np.array([0, 0, _heads(node), -1], np.int64),
                                        prefix + "shape")
        model.graph.initializer.append(shape)
        for x, perm in ((q, [0, 2, 1, 3]), (k, [0, 2, 3, 1])):
            new.append(helper.make_node("Reshape", [x, shape.name], [x + "/heads"]))
            new.append(helper.make_node("Transpose", [x + "/heads"], [x + "/t"], perm=perm))
        q_heads = q + "/heads"
    new.append(helper.make_node("MatMul", [q + "/t", k + "/t"], [prefix + "dots"]))
    if scale is None:  # 1 / sqrt(head size), from q's last axis
        new += [helper.make_node("Shape", [q_heads], [prefix + "dims"], start=-1),
                helper.make_node("Cast", [prefix + "dims"], [prefix + "size"],
                                 to=onnx.TensorProto.FLOAT),
                helper.make_node("Sqrt", [prefix + "size"], [prefix + "root"]),
                helper.make_node("Div", [prefix + "dots", prefix + "root"], [name])]
    else:
        factor = numpy_helper.from_array(np.array(scale, np.float32), prefix + "scale")
        model.graph.initializer.append(factor)
        new.append(helper.make_node("Mul", [prefix + "dots", factor.name], [name]))
    model.graph.node.extend(new)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _first_layers(w: _Walker, name: str) -> list[int]:
    """The target layers that read ``name`` through layout ops only."""
    found, stack, seen = [], [name], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for j, _ in w.index.consumers.get(n, []):
            lay = next((lay for lay in w.layers if lay.node_index == j), None)
            node = w.graph.node[j]
            if lay is not None:
                found.append(lay.index)
            elif node.op_type in LAYOUT_OPS and node.input[0] == n:
                stack.extend(o for o in node.output if o)
    return sorted(set(found))


def _residual(w: _Walker, i: int) -> Residual | None:
    node = w.graph.node[i]
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    a, b = node.input
    if not (a in w.tainted or b in w.tainted) or w.index.resolve_const(a) is not None \
            or w.index.resolve_const(b) is not None:
        return None
    for stream, branch in ((a, b), (b, a)):
        src = w.source(branch)
        if src is None or src[1]:
            continue
        last = w.layers[_pos(w, src[0])]
        if stream not in _ancestor_tensors(w, last.node_index):
            continue
        inside = w.index.ancestors(w.index.producer[branch]) | {w.index.producer[branch]}
        after = w.index.downstream({stream}, set())
        layers = [lay.index for lay in w.layers if lay.node_index in inside
                  and any(x in after for x in w.graph.node[lay.node_index].input)]
        nodes = frozenset(j for j in inside if any(x in after for x in w.graph.node[j].input))
        return Residual(i, stream, branch, last.index, layers,
                        norm=_norm(w, stream, inside, node.output[0]), nodes=nodes)
    return None


def _pos(w: _Walker, layer_index: int) -> int:
    return next(k for k, lay in enumerate(w.layers) if lay.index == layer_index)


def _ancestor_tensors(w: _Walker, i: int) -> set[str]:
    nodes = w.index.ancestors(i) | {i}
    return {x for j in nodes for x in w.graph.node[j].input if x}


def _norm(w: _Walker, stream: str, inside: set[int], out: str) -> str | None:
    """"pre" where the branch reads the stream through a normalisation, "post" where the
    residual Add's output goes into one."""
    if any(n.op_type in NORM_OPS for n in _reads(w, stream, inside)):
        return PRE
    if any(n.op_type in NORM_OPS for n in w.readers(out)):
        return POST
    return None


def _reads(w: _Walker, name: str, nodes: set[int]) -> list[onnx.NodeProto]:
    return [w.graph.node[j] for j, _ in w.index.consumers.get(name, []) if j in nodes]


def _writer(w: _Walker, first: Residual) -> tuple[str, Layer | None, str | None]:
    """The stream writer of the first residual Add: (key, layer, None) for a target layer,
    (Gather node name, None, table) for a token embedding; ("", None, None) where none."""
    stream = first.stream
    blocked = set(w.layer_nodes)
    norms = {j for j, n in enumerate(w.graph.node) if n.op_type in NORM_OPS}
    before = _ancestor_tensors(w, w.index.producer[stream]) | {stream} \
        if stream in w.index.producer else {stream}
    writers = []
    for lay in w.layers:
        if lay.output in before and stream in w.index.downstream({lay.output},
                                                                 blocked - {lay.node_index}):
            writers.append(lay)
    if writers:
        lay = writers[-1]
        if stream in w.index.downstream({lay.output}, blocked | norms):
            return lay.name, lay, None
        return "", None, None
    gathers = []
    inputs = {x.name for x in w.graph.input} - set(w.index.initializers)
    for j, node in enumerate(w.graph.node):
        if node.op_type != "Gather" or node.output[0] not in before:
            continue
        ref = w.index.resolve_const(node.input[0])
        if ref is None or ref.constant_node is not None:
            continue
        readers, returned = w.index.readers_through(ref.name, set())
        if len(readers) != 1 or returned:  # tied (to a head) or read elsewhere: not scaled
            continue
        table = w.index.initializers[ref.name]
        if table.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                   onnx.TensorProto.FLOAT16) or len(table.dims) != 2:
            continue
        if _from_input(w, node.input[1], inputs) \
                and stream in w.index.downstream({node.output[0]}, blocked | norms):
            gathers.append((j, node, ref.name))
    if len(gathers) == 1:
        j, node, table = gathers[0]
        return w.index.node_name(j), None, table
    return "", None, None


def _from_input(w: _Walker, name: str, inputs: set[str]) -> bool:
    """Whether ``name``'s values are computed from a graph input (not only its shape)."""
    stack, seen = [name], set()
    while stack:
        n = stack.pop()
        if n in inputs:
            return True
        if n in seen or n not in w.index.producer:
            continue
        seen.add(n)
        node = w.graph.node[w.index.producer[n]]
        if node.op_type in ("Shape", "Size", "ConstantOfShape", "Range"):
            continue
        stack.extend(x for x in node.input if x)
    return False


def find_roles(model: onnx.ModelProto, layers: list[Layer],
               notes: list[str] | None = None) -> dict[str, Role]:
    """Each target layer's transformer role, by layer name (``Layer.name``); a token embedding
    read by a Gather is keyed by the Gather's node name. Layers without a role are left out;
    a model without a recognised attention gets none (see the module's docstring).

    What the walk cannot prove gets no role and a note, never a guess: a Softmax in a
    residual branch that no attention was recognised from (an op the walk does not know
    between q.k^T and it, such as a soft-cap tanh), and a fused projection whose q, k, v
    units are not proven (``_Walker._piece``). A residual branch holding a Softmax or a
    MatMul of two computed tensors, with no attention recognised in it, is no MLP: its
    layers and those of the MLP branch after it in the same block get no role (the
    paper's rule). Such a branch still starts a block and is counted in ``n_blocks`` (it is
    a transformer block whose attention was not recognised), so that the other blocks'
    targets, 1 / (2 N_blocks), use the model's real depth.

    Args:
        model: The model (its main graph is read; layers in Loop/Scan bodies and If
            branches get no role).
        layers: Its target layers (``layers.find_layers``).
        notes: Where to append the notes (the report's); None: logged only.
    """
    w = _Walker(model, layers)
    if not w.layers:
        return {}
    said = notes if notes is not None else []

    def note(text: str) -> None:
        if text not in said:
            said.append(text)
            log.warning("%s", text)

    softmaxes = [j for j, n in enumerate(w.graph.node)
                 if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
    attentions = [a for j in softmaxes if (a := _attention(w, j)) is not None and a.q and a.k]
    attentions += _fused_attentions(w)
    if not attentions:
        return {}
    residuals = [r for j in range(len(w.graph.node)) if (r := _residual(w, j)) is not None]
    outs = {o: a for a in attentions for o in a.out}
    found = {a.softmax for a in attentions}
    block = -1
    had_mlp = True
    unknown_block = False
    for r in residuals:
        r.attention = r.last in outs
        like = not r.attention and any(  # an attention that was not recognised
            w.graph.node[j].op_type == "Softmax" or w.graph.node[j].op_type == "MatMul"
            and len(w.computed(w.graph.node[j].input)) == 2 for j in r.nodes)
        if r.attention or like or had_mlp:  # an attention (or an MLP after an MLP) starts one
            block += 1
            unknown_block = like
        else:  # the MLP after the block's attention: no role if that one was not recognised
            r.unknown = unknown_block
        r.unknown = r.unknown or like
        had_mlp = not (r.attention or like)
        r.block = block
    n_blocks = block + 1
    names = {lay.index: lay.name for lay in w.layers}
    for j in softmaxes:
        if j in found:
            continue
        r = next((r for r in residuals if j in r.nodes), None)
        if r is not None:
            note(f"policy 'transformer': Softmax {w.index.node_name(j)}: no attention "
                 f"recognised from it (an op between q.k^T and the Softmax that the walk does "
                 f"not know): block {r.block}'s layers ("
                 + ", ".join(names[k] for x in residuals if x.block == r.block
                             for k in x.layers) + ") get no role: the paper's rule")
    roles: dict[int, Role] = {}
    for r in residuals:
        if r.unknown:
            continue
        common = dict(block=r.block, n_blocks=n_blocks, norm=r.norm)
        roles[r.last] = Role("attn_out" if r.attention else "mlp_out", stream=r.stream,
                             branch=r.branch, residual=w.graph.node[r.node].output[0], **common)
        if not r.attention:
            for j in r.layers:
                if j != r.last:
                    roles[j] = Role("mlp_in", **common)
    by_block = {r.last: r for r in residuals}
    for a in attentions:
        r = next((by_block[o] for o in a.out if o in by_block), None)
        common = dict(block=r.block if r else None, n_blocks=n_blocks,
                      norm=r.norm if r else None, fused=a.fused or None)
        sources = [(which, src) for which, src in (("q", a.q), ("k", a.k), ("v", a.v))
                   if src is not None]
        for j in {src[0] for _, src in sources}:
            mine = [(which, piece) for which, (i, piece) in sources if i == j]
            old = roles.get(j)
            if old is not None and old.kind not in ("q", "k", "v", "qkv"):
                continue  # a branch's last layer: its residual rule
            logits = (old.logits if old else ()) + ((a.logits,) if a.logits else ())
            logits = tuple(dict.fromkeys(logits)) if any(x in ("q", "k") for x, _ in mine) \
                else ()
            qk = _qk_units(mine)
            if len(mine) == 1 and mine[0][1] == () and (old is None or old.kind == mine[0][0]):
                roles[j] = Role(mine[0][0], logits=logits, **common)
            elif qk is not None and old is None:
                roles[j] = Role("qkv", logits=logits, parts=PIECES, qk_units=qk, **common)
            else:  # one layer in two roles without telling its parts apart: none
                note(f"policy 'transformer': layer {names[j]} feeds "
                     + ", ".join(x for x, _ in mine) + f" of the attention at Softmax "
                     f"{w.index.node_name(a.softmax)}, cut in a way whose q, k, v units are "
                     "not proven (only a cut of the unit axis's outermost factor, or a "
                     "Reshape's factor of it, is): no role, the paper's rule")
                roles.pop(j, None)
    out: dict[str, Role] = {names[j]: role for j, role in sorted(roles.items())}
    if residuals:
        key, lay, table = _writer(w, residuals[0])
        if key and (lay is None or lay.index not in roles):
            out[key] = Role("embedding", n_blocks=n_blocks, stream=residuals[0].stream,
                            table=table)
        last_add = w.graph.node[residuals[-1].node].output[0]
        blocked = set(w.layer_nodes)
        for lay in w.layers:
            if lay.index in roles or lay.name in out:
                continue
            if last_add in _ancestor_tensors(w, lay.node_index) and w.index.graph_outputs & \
                    w.index.downstream({lay.output}, blocked - {lay.node_index}):
                out[lay.name] = Role("head", n_blocks=n_blocks)
    return out


def _qk_units(mine: list[tuple[str, Piece]]) -> tuple[int, ...] | None:
    """The q and k units of a layer that feeds q and k (and v) of one attention through
    proven pieces that do not overlap; None where that is not so."""
    if {"q", "k"} - {x for x, _ in mine} or any(not p or p == UNPROVEN for _, p in mine):
        return None
    sets = [set(p) for _, p in mine]
    if sum(len(x) for x in sets) != len(set().union(*sets)):
        return None
    return tuple(sorted(u for x, p in mine if x in ("q", "k") for u in p))
