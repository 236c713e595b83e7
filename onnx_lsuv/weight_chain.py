"""Weights that reach their layer through a chain of layout ops on a stored constant.

Exporters often store a kernel in their framework's layout and let the graph rearrange it:
jax2onnx writes a Keras/Flax conv weight as ``Transpose(HWIO constant)``, a Flax ConvTranspose
kernel as ``Transpose(Slice(constant, step -1))`` (the flip), PyTorch's Linear without
constant folding as ``Transpose(W)``, and a float16 store may be ``Cast`` to float32. The chain
is a pure rearrangement (a gather) of the stored elements, possibly with a change of dtype, so
LSUV works on the weight as the layer sees it (the effective weight) and writes each new value
back into the stored constant through the inverse gather: the model keeps its nodes.

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
CAST_OPS = ("Cast",)
_FLOAT = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
          onnx.TensorProto.BFLOAT16}
_DEFAULT_DOMAIN = ("", "ai.onnx")


@dataclass(frozen=True)
class WeightChain:
    """How a layer's effective weight is gathered from its stored constant.

    Attributes:
        nodes: Indices of the chain's nodes in ``graph.node``, from the constant to the layer.
        source: For every element of the effective weight (its shape), the flat index of the
            stored element it is; each stored element is used at most once.
        stored_shape: Shape of the stored constant.
        stored_dtype: Its numpy dtype.
        dtype: The dtype the layer reads (a Cast in the chain changes it).
    """

    nodes: tuple[int, ...]
    source: np.ndarray
    stored_shape: tuple[int, ...]
    stored_dtype: np.dtype
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The effective weight's shape (as the layer reads it)."""
        return tuple(self.source.shape)

    @property
    def covers_all(self) -> bool:
        """Whether every stored element reaches the layer (no Slice drops any)."""
        return self.source.size == int(np.prod(self.stored_shape))

    def effective(self, stored: np.ndarray) -> np.ndarray:
        """The tensor the layer reads (its shape and dtype), from the stored array."""
        return np.ascontiguousarray(stored.reshape(-1)[self.source].astype(self.dtype))

    def stored(self, effective: np.ndarray, old: np.ndarray) -> np.ndarray:
        """The stored array that gives ``effective``: ``old`` with the elements the layer reads
        replaced (those a Slice drops keep their values)."""
        flat = np.array(old, dtype=self.stored_dtype).reshape(-1)
        flat[self.source.reshape(-1)] = np.asarray(effective).reshape(-1).astype(
            self.stored_dtype)
        return flat.reshape(self.stored_shape)


def trace_chain(index: GraphIndex, name: str) -> tuple[ConstRef, list[int]] | None:
    """The constant that ``name`` is gathered from, and the chain's nodes (constant first).

    Every node of the chain is a layout op or a float-to-float Cast whose other inputs are
    constants, and each intermediate tensor is read only by the next node of the chain (a
    branch would make another reader of the weight). None when ``name`` is no such chain or
    is the constant itself (no nodes).
    """
    nodes: list[int] = []
    current = name
    while True:
        ref = index.resolve_weight(current)
        if ref is not None:
            return (ref, nodes[::-1]) if nodes else None
        i = index.producer.get(current)
        if i is None:
            return None
        node = index.graph.node[i]
        if node.domain not in _DEFAULT_DOMAIN or node.op_type not in LAYOUT_OPS + CAST_OPS:
            return None
        if node.op_type == "Cast" and int(attribute(node, "to", 0)) not in _FLOAT:
            return None
        if any(index.resolve_const(x) is None for x in node.input[1:] if x):
            return None
        if nodes:  # the intermediate read by the chain's next node must be read by it alone
            if len(index.consumers.get(current, [])) != 1 or current in index.graph_outputs:
                return None
        nodes.append(i)
        current = node.input[0]


def build_chain(index: GraphIndex, ref: ConstRef, nodes: list[int],
                end: str) -> WeightChain | None:
    """The gather of a traced chain ending at tensor ``end`` (what the layer reads), or None
    where it is not a pure rearrangement (an element used twice) or the reference evaluator
    cannot run it."""
    from onnx.reference import ReferenceEvaluator

    proto = index.weight_proto(ref)
    if proto.data_type not in _FLOAT:
        return None
    shape = tuple(int(d) for d in proto.dims)
    size = int(np.prod(shape))
    dtype = np.int64 if size >= 2 ** 31 else np.int32
    graph_nodes, inits = [], []
    current = "onnx_lsuv::index"
    for k, i in enumerate(nodes):
        src = index.graph.node[i]
        node = onnx.NodeProto()
        node.CopyFrom(src)
        node.ClearField("name")
        if node.op_type == "Cast":  # the indices stay integers: a Cast only changes the dtype
            node = helper.make_node("Identity", [current], [f"onnx_lsuv::step{k}"])
        else:
            for pos in range(1, len(node.input)):
                if node.input[pos]:
                    const = index.const_array(index.resolve_const(node.input[pos]))
                    cname = f"onnx_lsuv::const{k}_{pos}"
                    inits.append(numpy_helper.from_array(const, cname))
                    node.input[pos] = cname
            node.input[0] = current
            taken = index.graph.node[nodes[k + 1]].input[0] if k + 1 < len(nodes) else end
            outs = list(node.output)
            del node.output[:]
            node.output.extend(f"onnx_lsuv::step{k}_{j}" for j in range(len(outs)))
            current = node.output[outs.index(taken)]
        graph_nodes.append(node)
        if node.op_type == "Identity":
            current = node.output[0]
    graph = helper.make_graph(
        graph_nodes, "chain",
        [helper.make_tensor_value_info("onnx_lsuv::index",
                                       helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                       list(shape))],
        [helper.make_empty_tensor_value_info(current)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(index.opset, 7))],
                              ir_version=8)
    try:
        (source,) = ReferenceEvaluator(model).run(None, {
            "onnx_lsuv::index": np.arange(size, dtype=dtype).reshape(shape)})
    except Exception:  # an op or attribute the evaluator does not take: not handled
        return None
    source = np.ascontiguousarray(np.asarray(source))
    if source.size == 0 or np.bincount(source.reshape(-1), minlength=size).max() > 1:
        return None
    stored_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(proto.data_type))
    dtype = stored_dtype
    for i in nodes:
        if index.graph.node[i].op_type == "Cast":
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(
                int(attribute(index.graph.node[i], "to", 1))))
    return WeightChain(tuple(nodes), source, shape, stored_dtype, dtype)

