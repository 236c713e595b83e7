"""The tests' own notion of an exported model's LSUV targets, and their measurement.

Written without onnx_lsuv, from the definitions: a target is a Conv, ConvTranspose, Gemm,
MatMul or Einsum whose first input depends on the data and whose second does not (in the main
graph, or at the top of a Loop/Scan body, where a value the body returns unchanged does not
depend on the iteration); its output is the tensor after the Add of a data-independent operand
that follows it through shape-only ops, if there is one, else its own. Targets reading the same
weight tensor are one layer, measured pooled. Variances are float64 statistics of what ONNX Runtime
computes, with the tensors exposed by this module (body tensors as extra scan outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")
RECURRENT = ("LSTM", "GRU", "RNN")
SHAPE_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")


@dataclass
class Target:
    weight: str  # the weight tensor name the node reads
    outputs: list[str] = field(default_factory=list)  # tensors pooled (main graph or body)
    body_of: str | None = None  # the Loop/Scan node's name, for a body target
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    # It multiplies a recurrence's previous state (an LSTM op's R): orthonormal per gate, not
    # scaled. In a body: its input is computed from a carried state (not returned unchanged)
    # and that state's new value from its output; unrolled: one use reads what another
    # computed. (Without the refinement for paths through other layers, such as an unrolled
    # decoder's, which the exporters' single cells do not need.)
    state: bool = False


def _reads(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            inner = {o for n in a.g.node for o in n.output} | {i.name for i in a.g.input}
            names |= {x for n in a.g.node for x in _reads(n)} - inner
    return names


def _dependent(graph: onnx.GraphProto, seeds: set[str]) -> set[str]:
    dep = set(seeds)
    for node in graph.node:
        if _reads(node) & dep:
            dep.update(o for o in node.output if o)
    return dep


def data_dependent(model: onnx.ModelProto) -> set[str]:
    """Main-graph tensors that depend on a graph input (not an initializer)."""
    inits = {t.name for t in model.graph.initializer}
    return _dependent(model.graph, {i.name for i in model.graph.input if i.name not in inits})


def _after_bias(graph: onnx.GraphProto, node: onnx.NodeProto, dep: set[str]) -> str:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in _reads(n):
            readers.setdefault(x, []).append(n)
    outputs = {o.name for o in graph.output}
    cur = node.output[0]
    while len(readers.get(cur, [])) == 1 and cur not in outputs:
        nxt = readers[cur][0]
        if nxt.op_type == "Add":
            other = [x for x in nxt.input if x != cur]
            return nxt.output[0] if other and other[0] not in dep else node.output[0]
        if nxt.op_type not in SHAPE_OPS or nxt.input[0] != cur:
            break
        cur = nxt.output[0]
    return node.output[0]


def _carried(loop: onnx.NodeProto, body: onnx.GraphProto) -> list[tuple[int, int]]:
    """(body input, body output) positions of the values carried between iterations."""
    if loop.op_type == "Loop":
        return [(2 + k, 1 + k) for k in range(len(body.input) - 2)]
    n_scan = next(a.i for a in loop.attribute if a.name == "num_scan_inputs")
    return [(k, k) for k in range(len(body.input) - n_scan)]


def _multiplies_state(body: onnx.GraphProto, loop: onnx.NodeProto, inner: onnx.NodeProto,
                      fixed: set[str]) -> bool:
    out_dep = _dependent(body, set(inner.output))
    for pos, out in _carried(loop, body):
        name = body.input[pos].name
        if name not in fixed and inner.input[0] in _dependent(body, {name}) and \
                body.output[out].name in out_dep:
            return True
    return False


def _returned_unchanged(loop: onnx.NodeProto, body: onnx.GraphProto) -> set[str]:
    pairs = _carried(loop, body)
    producer = {o: n for n in body.node for o in n.output}
    same = set()
    for pos, out in pairs:
        name, ret = body.input[pos].name, body.output[out].name
        while ret in producer and producer[ret].op_type == "Identity":
            ret = producer[ret].input[0]
        if ret == name:
            same.add(name)
    return same


def find_targets(model: onnx.ModelProto) -> tuple[list[Target], list[str]]:
    """The targets (pooled by weight) and the names of the recurrent ops."""
    g = model.graph
    dep = data_dependent(model)
    groups: dict[tuple, Target] = {}
    recurrent = []
    for node in g.node:
        if node.op_type in TARGETS and node.input[0] in dep and node.input[1] not in dep:
            t = groups.setdefault((None, node.input[1]), Target(node.input[1]))
            t.outputs.append(_after_bias(g, node, dep))
            t.nodes.append(node)
        elif node.op_type in RECURRENT:
            recurrent.append(node.name)
        elif node.op_type in ("Loop", "Scan"):
            body = next(a.g for a in node.attribute if a.name == "body")
            fixed = _returned_unchanged(node, body)
            seeds = {i.name for i in body.input if i.name not in fixed}
            seeds |= {x for n in body.node for x in _reads(n)} & dep
            body_dep = _dependent(body, seeds)
            for inner in body.node:
                if inner.op_type in TARGETS and inner.input[0] in body_dep and \
                        inner.input[1] not in body_dep:
                    t = groups.setdefault((node.name, inner.input[1]),
                                          Target(inner.input[1], body_of=node.name))
                    t.outputs.append(_after_bias(body, inner, body_dep))
                    t.nodes.append(inner)
                    t.state |= _multiplies_state(body, node, inner, fixed)
    for t in groups.values():
        if t.body_of is None and len(t.nodes) > 1:
            reach = _dependent(g, {o for n in t.nodes for o in n.output})
            t.state = any(n.input[0] in reach for n in t.nodes)
    return list(groups.values()), recurrent


def _expose_in_body(m: onnx.ModelProto, loop_name: str, inner: str, seen: str) -> str:
    """Make body tensor ``inner`` of Loop/Scan ``loop_name`` (in ``m``, changed in place) an
    extra scan output, every iteration's value stacked; its name in the main graph."""
    loop = next(n for n in m.graph.node if n.name == loop_name)
    body = next(a.g for a in loop.attribute if a.name == "body")
    # Node outputs listed for every body output before new scan outputs are added.
    n_out = len(body.output) - (1 if loop.op_type == "Loop" else 0)
    while len(loop.output) < n_out:
        loop.output.append(f"{seen}_unused_{len(loop.output)}")
    body.node.append(helper.make_node("Identity", [inner], [seen]))
    body.output.append(helper.make_tensor_value_info(seen, TensorProto.FLOAT, None))
    loop.output.append(seen + "_all")
    return seen + "_all"


def body_values(model: onnx.ModelProto, feeds: dict, loop_name: str,
                inner: list[str]) -> list[np.ndarray]:
    """Body tensors ``inner`` of Loop/Scan ``loop_name`` over every iteration (float64), from
    the test's own copy that returns them as extra scan outputs."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    outs = [_expose_in_body(m, loop_name, name, f"independent_{name}_seen") for name in inner]
    m.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outs)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v, np.float64) for v in sess.run(outs, feeds)]


def branch_values(model: onnx.ModelProto, feeds: dict, path: list[tuple[str, str]],
                  inner: list[str], elem: int = TensorProto.FLOAT) -> list[np.ndarray]:
    """Tensors ``inner`` (of type ``elem``) of the If branch at ``path`` ((If node name,
    "then_branch" or "else_branch") per level, outermost first) as the data computes them
    (float64), from the test's own copy that returns them as new outputs of each If on the
    way out: the other branch returns an empty tensor in their place. The data must take the
    branch (else the values come back empty)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    graph, levels = m.graph, []
    for if_name, attr in path:
        node = next(n for n in graph.node if n.name == if_name and n.op_type == "If")
        levels.append((node, attr))
        graph = next(a.g for a in node.attribute if a.name == attr)
    names = list(inner)
    for depth in reversed(range(len(levels))):
        node, attr = levels[depth]
        outs = []
        for k, name in enumerate(names):
            for a in node.attribute:
                seen = f"independent_branch_{depth}_{k}_{a.name}"
                if a.name == attr:
                    a.g.node.append(helper.make_node("Identity", [name], [seen]))
                else:
                    empty = onnx.numpy_helper.from_array(
                        np.zeros(0, helper.tensor_dtype_to_np_dtype(elem)))
                    a.g.node.append(helper.make_node("Constant", [], [seen], value=empty))
                a.g.output.append(helper.make_tensor_value_info(seen, elem, None))
            outs.append(f"independent_branch_{depth}_{k}")
            node.output.append(outs[-1])
        names = outs
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v, np.float64) for v in sess.run(names, feeds)]


def pooled_variances(model: onnx.ModelProto, feeds: dict, targets: list[Target]) -> list[float]:
    """Each target's variance, all its outputs (and, in a body, all iterations) pooled."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    names: list[list[str]] = []
    for k, t in enumerate(targets):
        if t.body_of is None:
            names.append(list(t.outputs))
            continue
        names.append([_expose_in_body(m, t.body_of, inner, f"independent_{k}_{j}")
                      for j, inner in enumerate(t.outputs)])
    flat = list(dict.fromkeys(n for group in names for n in group))
    if not flat:
        return []
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in flat)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(flat, sess.run(flat, feeds)))
    return [float(np.var(np.concatenate([values[n].astype(np.float64).ravel()
                                         for n in group]))) for group in names]


def weight_values(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list[np.ndarray]:
    """Main-graph tensors (weights as the nodes read them: ORT computes any chain of ops)."""
    if not names:
        return []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def read_weights(model: onnx.ModelProto, feeds: dict, targets: list[Target]) -> list[np.ndarray]:
    """Each target's weight as its first node reads it (computed by ORT, any chain included);
    in a body, as the first iteration reads it (returned as an extra scan output)."""
    if not targets:
        return []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    names = []
    for k, t in enumerate(targets):
        if t.body_of is None:
            names.append(t.weight)
            continue
        names.append(_expose_in_body(m, t.body_of, t.nodes[0].input[1], f"independent_w_{k}"))
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(dict.fromkeys(names), sess.run(list(dict.fromkeys(names)), feeds)))
    return [np.asarray(values[n][0] if t.body_of else values[n], np.float64)
            for n, t in zip(names, targets)]


def orthonormal_per_gate(node: onnx.NodeProto, w: np.ndarray, atol: float = 1e-5) -> bool:
    """A state-multiplying weight: each gate block (state units x state units: as many gates
    as output units over input units) has Q Q^T = I, orthonormal and not scaled."""
    rows, cols = matrices(node, w).shape[1:]
    if rows % cols:
        return False
    for block in matrices(node, w, rows // cols):
        if not np.allclose(block @ block.T, np.eye(cols), atol=atol):
            return False
    return True


def matrices(node: onnx.NodeProto, w: np.ndarray, parts: int = 1) -> np.ndarray:
    """(groups, output units, fan-in) view of a target node's weight, from the ONNX spec."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Einsum":  # 'btd,dh->bth': rows h (the weight's labels kept), columns d
        equation = attrs["equation"].decode().replace(" ", "")
        weight, out = equation.split(",")[1].split("->")
        rows = [c for c in out if c in weight]
        cols = [c for c in weight if c not in out]
        w = np.transpose(w, [weight.index(c) for c in rows + cols])
        n_rows = int(np.prod(w.shape[:len(rows)]))
        return w.reshape(parts, n_rows // parts, -1)
    if node.op_type == "Conv":
        g = int(attrs.get("group", 1))
        return w.reshape(g, w.shape[0] // g, -1)
    if node.op_type == "ConvTranspose":
        g = int(attrs.get("group", 1))
        c, m = w.shape[0], w.shape[1]
        return w.reshape(g, c // g, m, -1).transpose(0, 2, 1, 3).reshape(g, m, -1)
    if node.op_type == "Gemm" and attrs.get("transB", 0):
        w = w.T
    return w.T.reshape(parts, w.shape[1] // parts, w.shape[0])


def orthonormal_up_to_scale(mats: np.ndarray, atol: float = 1e-4) -> bool:
    for m in np.asarray(mats, np.float64):
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        if not np.allclose(gram / gram[0, 0], np.eye(len(gram)), atol=atol):
            return False
    return True


GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def gate_variances(model: onnx.ModelProto, feeds: dict, node_name: str) -> list[float]:
    """An LSTM/GRU/RNN node's input projections W_g x, per direction and gate: their variance
    over every time step and batch row (float64, from the node's input and its W as ONNX
    Runtime computes them, through any chain of ops on the stored W)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    x, w = weight_values(model, feeds, [node.input[0], node.input[1]])  # W through any chain
    w = np.asarray(w, np.float64)
    x = np.asarray(x, np.float64).reshape(-1, w.shape[2])
    out = []
    for d in range(w.shape[0]):
        proj = x @ w[d].T
        for part in np.split(proj, GATES[node.op_type], axis=1):
            out.append(float(np.var(part)))
    return out
