"""Weights that reach their layer through a chain of layout ops on a stored constant.

Exporters often store a kernel in their framework's layout and let the graph rearrange it:
jax2onnx writes a Keras/Flax conv weight as ``Transpose(HWIO constant)``, a Flax ConvTranspose
kernel as ``Transpose(Slice(constant, step -1))`` (the flip), PyTorch's Linear without
constant folding as ``Transpose(W)``, PyTorch's LSTM without it as
``Unsqueeze(Concat(Slice(w), Slice(w), Slice(w)))`` (torch's gate order i, f, g, o reordered
into ONNX's i, o, f, c), and a float16 store may be ``Cast`` to float32. The chain
is a pure rearrangement (a gather) of the stored elements, possibly with a change of dtype, so
LSUV works on the weight as the layer sees it (the effective weight) and writes each new value
back into the stored constant through the inverse gather: the model keeps its nodes.

A Concat may join parts of two constants (torch's LSTM bias B from b_ih and b_hh): the gather
then reads the constants laid end to end, and each is written back through its own part.

The gather is found by running the chain itself on the element indices of the constant, with
onnx's reference evaluator (so every op's semantics, Slice with negative steps and Reshape's 0
and -1 included, are onnx's own, not reimplemented here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import ConstRef, GraphIndex, attribute

# Ops that only move elements (their first input is the data; the others must be constants).
LAYOUT_OPS = ("Transpose", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten",
              "Split")
# Ops that join parts (every input is data): PyTorch's TorchScript exporter reorders an LSTM's
# gates from torch's (i, f, g, o) into ONNX's (i, o, f, c) as Concat(Slice(w), ...), and builds
# B as Concat(b_ih parts, b_hh parts), when it does not fold constants.
JOIN_OPS = ("Concat",)
CAST_OPS = ("Cast",)
_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
          onnx.TensorProto.BFLOAT16}
_DEFAULT_DOMAIN = ("", "ai.onnx")


@dataclass(frozen=True)
class WeightChain:
    """How a layer's effective weight is gathered from its stored constant (or constants).

    Attributes:
        nodes: Indices of the chain's nodes in ``graph.node``, in graph (topological) order.
        source: For every element of the effective weight (its shape), the flat index of the
            stored element it is; each stored element is used at most once. With several
            stored constants (``more``), the indices of each follow the previous ones'.
        stored_shape: Shape of the (first) stored constant.
        stored_dtype: Its numpy dtype (every stored constant's).
        dtype: The dtype the layer reads (a Cast in the chain changes it).
        more: The further stored constants the chain joins (a Concat of two), with their
            shapes: an LSTM's B from torch's b_ih and b_hh. Empty for one constant.
    """

    nodes: tuple[int, ...]
    source: np.ndarray
    stored_shape: tuple[int, ...]
    stored_dtype: np.dtype
    dtype: np.dtype
    more: tuple[tuple[ConstRef, tuple[int, ...]], ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The effective weight's shape (as the layer reads it)."""
        return tuple(self.source.shape)

    @property
    def parts(self) -> int:
        """How many stored constants the chain reads."""
        return 1 + len(self.more)

    def _range(self, part: int) -> tuple[int, int]:
        sizes = [int(np.prod(self.stored_shape))] + [int(np.prod(s)) for _, s in self.more]
        start = sum(sizes[:part])
        return start, start + sizes[part]

    @property
    def covers_all(self) -> bool:
        """Whether every stored element reaches the layer (no Slice drops any)."""
        return all(self.covers(k) for k in range(self.parts))

    def covers(self, part: int) -> bool:
        """Whether every element of stored constant ``part`` (0: the first) reaches the layer."""
        lo, hi = self._range(part)
        return int(np.count_nonzero((self.source >= lo) & (self.source < hi))) == hi - lo

    def effective(self, stored: np.ndarray, *more: np.ndarray) -> np.ndarray:
        """The tensor the layer reads (its shape and dtype), from the stored array (and those
        of ``more``, in order)."""
        if len(more) != len(self.more):
            raise ValueError(f"the chain reads {self.parts} stored constants, got "
                             f"{1 + len(more)}")
        flat = stored.reshape(-1) if not more else np.concatenate(
            [np.asarray(a, self.stored_dtype).reshape(-1) for a in (stored, *more)])
        return np.ascontiguousarray(flat[self.source].astype(self.dtype))

    def stored(self, effective: np.ndarray, old: np.ndarray, part: int = 0) -> np.ndarray:
        """The stored array (of constant ``part``) that gives ``effective``: ``old`` with the
        elements the layer reads replaced (those a Slice drops keep their values)."""
        flat = np.array(old, dtype=self.stored_dtype).reshape(-1)
        source = self.source.reshape(-1)
        values = np.asarray(effective).reshape(-1).astype(self.stored_dtype)
        if not self.more:
            flat[source] = values
        else:
            lo, hi = self._range(part)
            mine = (source >= lo) & (source < hi)
            flat[source[mine] - lo] = values[mine]
        return flat.reshape(old.shape if part else self.stored_shape)


def trace_chain(index: GraphIndex, name: str) -> tuple[tuple[ConstRef, ...], list[int]] | None:
    """The constants that ``name`` is gathered from (in the order its Concats read them) and
    the chain's nodes (in graph order).

    Every node of the chain is a layout op or a float-to-float Cast whose other inputs are
    constants, or a Concat of such chains, and each intermediate tensor is read only by the
    next node of the chain (a branch would make another reader of the weight); the stored
    constants may be read by several of its nodes (the Slices of torch's gate reorder). None
    when ``name`` is no such chain or is the constant itself (no nodes).
    """
    nodes: set[int] = set()
    refs: list[ConstRef] = []

    def walk(current: str, end: bool) -> bool:
        ref = index.resolve_weight(current)
        if ref is not None:
            if ref not in refs:
                refs.append(ref)
            return not end
        i = index.producer.get(current)
        if i is None:
            return False
        node = index.graph.node[i]
        if node.domain not in _DEFAULT_DOMAIN or \
                node.op_type not in LAYOUT_OPS + CAST_OPS + JOIN_OPS:
            return False
        if node.op_type == "Cast" and int(attribute(node, "to", 0)) not in _FLOAT:
            return False
        # the intermediate read by the chain's next node must be read by it alone
        if not end and (len(index.consumers.get(current, [])) != 1
                        or current in index.graph_outputs):
            return False
        if i in nodes:  # another output of a Split already walked
            return True
        nodes.add(i)
        if node.op_type in JOIN_OPS:
            return all(x and walk(x, False) for x in node.input)
        if any(index.resolve_const(x) is None for x in node.input[1:] if x):
            return False
        return walk(node.input[0], False)

    if not walk(name, True):
        return None
    return tuple(refs), sorted(nodes)


def build_chain(index: GraphIndex, refs: tuple[ConstRef, ...], nodes: list[int],
                end: str) -> WeightChain | None:
    """The gather of a traced chain ending at tensor ``end`` (what the layer reads), or None
    where it is not a pure rearrangement (an element used twice), its constants differ in
    dtype, or the reference evaluator cannot run it."""
    from onnx.reference import ReferenceEvaluator

    protos = [index.weight_proto(ref) for ref in refs]
    if protos[0].data_type not in _FLOAT or any(p.data_type != protos[0].data_type
                                                for p in protos):
        return None
    shapes = [tuple(int(d) for d in p.dims) for p in protos]
    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes)
    dtype = np.int64 if total >= 2 ** 31 else np.int32
    leaves = {ref.name: f"onnx_lsuv::index{k}" for k, ref in enumerate(refs)}
    chain_nodes = set(nodes)
    graph_nodes, inits = [], []
    for k, i in enumerate(nodes):
        src = index.graph.node[i]
        node = onnx.NodeProto()
        node.CopyFrom(src)
        node.ClearField("name")
        if node.op_type == "Cast":  # the indices stay integers: a Cast only changes the dtype
            node = helper.make_node("Identity", [src.input[0]], [src.output[0]])
        data = range(len(node.input)) if node.op_type in JOIN_OPS else [0]
        for pos in range(len(node.input)):
            x = node.input[pos]
            if not x:
                continue
            if pos in data:  # a chain node's output keeps its name; a leaf is an index input
                if index.producer.get(x) not in chain_nodes:
                    node.input[pos] = leaves[index.resolve_weight(x).name]
                continue
            cname = f"onnx_lsuv::const{k}_{pos}"
            inits.append(numpy_helper.from_array(
                index.const_array(index.resolve_const(x)), cname))
            node.input[pos] = cname
        graph_nodes.append(node)
    itype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        graph_nodes, "chain",
        [helper.make_tensor_value_info(leaves[ref.name], itype, list(shape))
         for ref, shape in zip(refs, shapes)],
        [helper.make_empty_tensor_value_info(end)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(index.opset, 7))],
                              ir_version=8)
    offsets = np.cumsum([0] + sizes)
    feeds = {leaves[ref.name]: np.arange(offsets[k], offsets[k + 1], dtype=dtype).reshape(shape)
             for k, (ref, shape) in enumerate(zip(refs, shapes))}
    try:
        (source,) = ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # an op or attribute the evaluator does not take: not handled
        return None
    source = np.ascontiguousarray(np.asarray(source))
    if source.size == 0 or np.bincount(source.reshape(-1), minlength=total).max() > 1:
        return None
    stored_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(protos[0].data_type))
    dtype = stored_dtype
    for i in nodes:
        if index.graph.node[i].op_type == "Cast":
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(
                int(attribute(index.graph.node[i], "to", 1))))
    return WeightChain(tuple(nodes), source, shapes[0], stored_dtype, dtype,
                       tuple(zip(refs[1:], shapes[1:])))
