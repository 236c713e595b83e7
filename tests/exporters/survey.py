"""Survey how exported ONNX graphs feed their Conv/Gemm/MatMul/RNN weights and biases.

Usage: python survey.py [--condensed] MODEL.onnx [MODEL.onnx ...]   (needs only onnx, numpy)

--condensed leaves out the data operands and counts identical per-node patterns once.

For every Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU and RNN node, in the main graph and in
any If/Loop/Scan body, it prints:

* each operand: where it comes from, as the chain of producer ops back to the leaves
  (initializer, Constant node, graph input, subgraph input), with the attributes/constant
  operands that matter (Transpose perm, Slice starts/ends/axes/steps, Reshape shape, ...);
  whether it is constant-derived (no graph input involved) and how many nodes read the
  tensor and its leaf initializer(s);
* the bias: an op input (Conv/Gemm input 2, RNN B), or the first Add/Sub of a constant-derived
  tensor found downstream through layout-only ops (Reshape/Transpose/Squeeze/...), with the
  chain and the bias constant's shape;
* the op that follows (after the bias, skipping layout-only ops).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

TARGETS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten",
              "Expand")
# Operands of these ops (beyond the first) are shown as values, not traced as chains.
SMALL_CONST_OPERANDS = {
    "Slice": ("starts", "ends", "axes", "steps"),
    "Reshape": ("shape",),
    "Squeeze": ("axes",),
    "Unsqueeze": ("axes",),
    "Expand": ("shape",),
    "Split": ("split",),
    "Gather": ("indices",),
    "Pad": ("pads", "constant_value", "axes"),
    "Tile": ("repeats",),
}
MAX_DEPTH = 12


def fmt_shape(shape):
    return "[" + ",".join(str(d) for d in shape) + "]"


def attr_str(node):
    out = []
    for a in node.attribute:
        if a.name in ("value",) or a.type in (onnx.AttributeProto.GRAPH,
                                             onnx.AttributeProto.GRAPHS):
            continue
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        out.append(f"{a.name}={v}")
    return ",".join(out)


class Scope:
    """One graph (main or a body) with a link to the enclosing scope."""

    def __init__(self, graph, parent=None, owner=None, owner_node=None):
        self.graph = graph
        self.parent = parent
        self.owner = owner  # (op_type.attr, name) of the node owning this body
        self.owner_node = owner_node
        self.producer = {}
        for n in graph.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.shapes = {}
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value")
                                        else (d.dim_param or "?") for d in t.shape.dim]
        for t in graph.initializer:
            self.shapes[t.name] = list(t.dims)

    def path(self):
        parts = []
        s = self
        while s.parent is not None:
            parts.append(f"{s.owner[0]}:{s.owner[1]}")
            s = s.parent
        return "/".join(reversed(parts)) or "main"

    def lookup(self, name):
        """('init'|'node'|'input'|'outer_missing', object, scope)."""
        s = self
        while s is not None:
            if name in s.inits:
                return "init", s.inits[name], s
            if name in s.producer:
                return "node", s.producer[name], s
            if name in s.inputs:
                carried = s.carried(name)
                if carried is not None:
                    return "carried", carried, s
                return "input", name, s
            s = s.parent
        return "missing", name, None

    def through_identity(self, name):
        """The tensor an Identity chain inside this graph starts from."""
        for _ in range(20):
            n = self.producer.get(name)
            if n is None or n.op_type != "Identity":
                return name
            name = n.input[0]
        return name

    def carried(self, name):
        """A Loop/Scan body input that is a loop-carried state fed from the owner's input:
        (label, outer tensor name, passed through unchanged?) or None."""
        n = self.owner_node
        if n is None or n.op_type not in ("Loop", "Scan"):
            return None
        names = [i.name for i in self.graph.input]
        outs = [self.through_identity(o.name) for o in self.graph.output]
        k = names.index(name)
        if n.op_type == "Loop":
            if k < 2 or k >= len(n.input):
                return None
            outer = n.input[k]
            through = k - 1 < len(outs) and outs[k - 1] == name
            return f"Loop-carried#{k - 2}", outer, through
        nsi = next((a.i for a in n.attribute if a.name == "num_scan_inputs"), 0)
        nstate = len(n.input) - nsi
        if k < nstate:
            return f"Scan-state#{k}", n.input[k], k < len(outs) and outs[k] == name
        return f"Scan-input#{k - nstate}", n.input[k], False

    def shape(self, name):
        s = self
        while s is not None:
            if name in s.shapes:
                return s.shapes[name]
            s = s.parent
        return None


def all_nodes(graph):
    """Every node of graph and of its bodies, recursively."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_nodes(g)


def implicit_inputs(graph):
    """Names a body reads from outer scopes (not produced or declared inside it)."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        local.update(o for o in n.output)
    used = set()
    for n in graph.node:
        used.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used.update(implicit_inputs(a.g))
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    used.update(implicit_inputs(g))
    return used - local


class Survey:
    def __init__(self, model):
        self.model = model
        try:
            self.model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - shapes are a nicety
            pass
        # readers of each name across all graphs (a body's implicit use counts for its owner
        # node AND the reading nodes inside it: we count the reading nodes inside bodies)
        self.readers = defaultdict(list)
        for n in all_nodes(self.model.graph):
            for i in n.input:
                if i:
                    self.readers[i].append(n)
        self.consumers_cache = {}

    # ---- constant evaluation (small operands) ----
    def const_value(self, scope, name, depth=0):
        kind, obj, s = scope.lookup(name)
        if kind == "init":
            return numpy_helper.to_array(obj)
        if kind == "node" and depth < 6:
            n = obj
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        return numpy_helper.to_array(a.t)
                    if a.name in ("value_ints", "value_floats"):
                        return np.array(onnx.helper.get_attribute_value(a))
                    if a.name in ("value_int", "value_float"):
                        return np.array(onnx.helper.get_attribute_value(a))
            if n.op_type in ("Identity", "Cast") and n.input:
                return self.const_value(s, n.input[0], depth + 1)
        return None

    def is_const(self, scope, name, depth=0):
        """True when the tensor depends on no graph/body input."""
        if depth > 60:
            return False
        kind, obj, s = scope.lookup(name)
        if kind == "init":
            return True
        if kind in ("input", "missing"):
            return False
        if kind == "carried":
            label, outer, through = obj
            return through and label.startswith(("Loop-carried", "Scan-state")) and \
                self.is_const(s.parent, outer, depth + 1)
        n = obj
        if n.op_type == "Constant":
            return True
        if n.op_type in ("Shape", "Size") :
            return False
        ins = [i for i in n.input if i]
        if not ins and n.op_type not in ("Constant",):
            return n.op_type in ("ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike")
        return all(self.is_const(s, i, depth + 1) for i in ins)

    # ---- chain description ----
    def describe(self, scope, name, depth=0):
        kind, obj, s = scope.lookup(name)
        shp = scope.shape(name)
        shp_s = fmt_shape(shp) if shp is not None else ""
        if kind == "init":
            where = "" if s is scope else f"(outer:{s.path()})"
            return f"init:{name}{fmt_shape(obj.dims)}{where}"
        if kind == "input":
            tag = "graph-input" if s.parent is None else f"body-input({s.path()})"
            return f"{tag}:{name}{shp_s}"
        if kind == "missing":
            return f"??:{name}"
        if kind == "carried":
            label, outer, through = obj
            tag = "passthrough" if through else "UPDATED each iteration"
            return (f"{label}({tag}):{name}{shp_s} <=outer= "
                    f"{self.describe(s.parent, outer, depth + 1)}")
        n = obj
        if n.op_type == "Constant":
            v = self.const_value(s, name)
            vs = fmt_shape(v.shape) if v is not None else "?"
            return f"Constant:{name}{vs}"
        if depth >= MAX_DEPTH:
            return f"{n.op_type}(...)"
        a = attr_str(n)
        head = n.op_type + (f"({a})" if a else "")
        names = SMALL_CONST_OPERANDS.get(n.op_type)
        parts = []
        for k, i in enumerate(n.input):
            if not i:
                continue
            if names and k >= 1:
                label = names[k - 1] if k - 1 < len(names) else f"in{k}"
                v = self.const_value(s, i)
                if v is not None and v.size <= 16:
                    parts.append(f"{label}={v.tolist()}")
                    continue
                parts.append(f"{label}=<{self.describe(s, i, depth + 1)}>")
                continue
            parts.append(self.describe(s, i, depth + 1))
        inner = parts[0] if len(parts) == 1 else "{" + " ; ".join(parts) + "}"
        return f"{head}{shp_s} <- {inner}"

    def leaves(self, scope, name, acc, depth=0):
        kind, obj, s = scope.lookup(name)
        if kind == "init":
            acc.append(name)
            return
        if kind == "carried":
            self.leaves(s.parent, obj[1], acc, depth + 1)
            return
        if kind != "node" or depth > 60:
            return
        if obj.op_type == "Constant":
            acc.append(name)
            return
        for i in obj.input:
            if i:
                self.leaves(s, i, acc, depth + 1)

    def chain_tensors(self, scope, name, depth=0):
        """The tensors from name back to its leaf along first inputs (and loop states)."""
        out = [name]
        for _ in range(30):
            kind, obj, s = scope.lookup(name)
            if kind == "carried":
                scope, name = s.parent, obj[1]
            elif kind == "node" and obj.op_type != "Constant" and obj.input:
                scope, name = s, obj.input[0]
            else:
                break
            out.append(name)
        return out

    # ---- downstream ----
    def consumers(self, scope, name):
        """Consumers of name inside this scope (and bodies of nodes in it)."""
        out = []
        for n in scope.graph.node:
            if name in n.input:
                out.append(n)
            else:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH and name in implicit_inputs(a.g):
                        out.append(n)
                        break
        return out

    def downstream(self, scope, out_name):
        """Walk through layout-only single-consumer ops to a bias Add and a following op."""
        chain = []
        name = out_name
        bias = None
        follow = None
        for _ in range(10):
            # Shape/Size only read the shape: not a data path
            cons = [c for c in self.consumers(scope, name) if c.op_type not in ("Shape", "Size")]
            if len(cons) != 1:
                follow = ("fan-out:" + ",".join(c.op_type for c in cons)
                          if cons else "graph-output")
                if chain:
                    follow = " -> ".join(chain) + " -> " + follow
                break
            c = cons[0]
            if c.op_type in LAYOUT_OPS and c.input[0] == name:
                a = attr_str(c)
                extra = ""
                labels = SMALL_CONST_OPERANDS.get(c.op_type, ())
                if len(c.input) > 1 and c.input[1] and labels:
                    v = self.const_value(scope, c.input[1])
                    extra = f"{labels[0]}={v.tolist() if v is not None else '<dyn>'}"
                chain.append(c.op_type + (f"({a or extra})" if (a or extra) else ""))
                name = c.output[0]
                continue
            if c.op_type in ("Mul", "Div") and len(c.input) == 2:
                other = [i for i in c.input if i != name]
                if other and self.is_const(scope, other[0]):
                    v = self.const_value(scope, other[0])
                    shp = list(v.shape) if v is not None else scope.shape(other[0])
                    scalar = v is not None and v.size == 1
                    chain.append(f"{c.op_type}(const {fmt_shape(shp or ['?'])}"
                                 f"{f' scalar={float(v):.4g}' if scalar else ''})")
                    name = c.output[0]
                    continue
            if bias is None and c.op_type in ("Add", "Sub"):
                other = [i for i in c.input if i != name]
                if other and self.is_const(scope, other[0]):
                    bshape = scope.shape(other[0])
                    v = self.const_value(scope, other[0])
                    if v is not None:
                        bshape = list(v.shape)
                        stat = f" mean|b|={float(np.abs(v).mean()):.3g}"
                    else:
                        stat = ""
                    bias = (f"{c.op_type} after [{' -> '.join(chain) or 'direct'}], bias "
                            f"{self.describe(scope, other[0])} shape={bshape}{stat}")
                    chain = []
                    name = c.output[0]
                    continue
            a = attr_str(c)
            follow = c.op_type + (f"({a})" if a and len(a) < 60 else "")
            if chain:
                follow = " -> ".join(chain) + " -> " + follow
            break
        return bias, follow

    # ---- per node ----
    def report_node(self, scope, node, lines):
        name = node.name or "(unnamed)"
        out_shape = fmt_shape(scope.shape(node.output[0]) or ["?"])
        lines.append(f"[{scope.path()}] {node.op_type} {name}  out={out_shape}"
                     + (f"  attrs: {attr_str(node)}" if attr_str(node) else ""))
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            roles = {1: "W", 2: "B"}
        elif op == "Gemm":
            roles = {0: "A", 1: "B", 2: "C"}
        elif op == "MatMul":
            roles = {0: "A", 1: "B"}
        else:
            roles = {1: "W", 2: "R", 3: "B", 5: "initial_h", 6: "initial_c"}
        for k, role in roles.items():
            if k >= len(node.input) or not node.input[k]:
                continue
            i = node.input[k]
            const = self.is_const(scope, i)
            if not const and role in ("A",):
                lines.append(f"    {role}: data ({self.short(scope, i)})")
                continue
            if not const and op == "MatMul":
                lines.append(f"    {role}: data ({self.short(scope, i)})")
                continue
            if not const and role in ("initial_h", "initial_c"):
                lines.append(f"    {role}: data ({self.short(scope, i)})")
                continue
            leaves = []
            self.leaves(scope, i, leaves)
            nread = len(self.readers[i])
            leaf_reads = {leaf: len(self.readers[leaf]) for leaf in leaves}
            shared = ""
            if nread > 1:
                ops = ",".join(sorted({r.op_type for r in self.readers[i]}))
                shared += f" tensor read by {nread} nodes ({ops})"
            many = {leaf: c for leaf, c in leaf_reads.items() if c > 1}
            if many:
                shared += " leaf readers: " + ",".join(f"{t}x{c}" for t, c in many.items())
            mid = {t: len(self.readers[t]) for t in self.chain_tensors(scope, i)[1:]
                   if t not in many and len(self.readers[t]) > 1}
            if mid:
                shared += " along the chain: " + ",".join(
                    f"{t}x{c}({'+'.join(sorted({r.op_type for r in self.readers[t]}))})"
                    for t, c in mid.items())
            lines.append(f"    {role}: {'const' if const else 'DATA'} {self.describe(scope, i)}"
                         + (f"\n       shared:{shared}" if shared else ""))
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            bias, follow = self.downstream(scope, node.output[0])
            has_b = (op in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2
                     and node.input[2])
            if bias:
                lines.append(f"    {'also a downstream' if has_b else 'bias(separate)'}: {bias}")
            elif not any(r in ("B", "C") and k < len(node.input) and node.input[k]
                         for k, r in roles.items() if op != "MatMul"):
                lines.append("    bias: none found")
            lines.append(f"    next: {follow}")
        else:
            # recurrent: list the outputs used
            used = []
            for j, o in enumerate(node.output):
                if o and self.consumers(scope, o):
                    used.append(("Y", "Y_h", "Y_c")[j] + "->" + ",".join(
                        c.op_type for c in self.consumers(scope, o)))
            lines.append(f"    outputs used: {'; '.join(used) or 'graph outputs only'}")

    def short(self, scope, name):
        kind, obj, _ = scope.lookup(name)
        if kind == "node":
            return f"{obj.op_type} {name}{fmt_shape(scope.shape(name) or ['?'])}"
        return f"{kind}:{name}"

    def walk(self, graph, parent=None, owner=None, lines=None, owner_node=None):
        scope = Scope(graph, parent, owner, owner_node)
        for n in graph.node:
            if n.op_type in TARGETS:
                block = []
                self.report_node(scope, n, block)
                lines.append(block)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self.walk(a.g, scope, (n.op_type + "." + a.name, n.name), lines, n)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        self.walk(g, scope, (n.op_type + "." + a.name, n.name), lines, n)
        return lines


def op_histogram(graph):
    h = defaultdict(int)
    for n in all_nodes(graph):
        h[n.op_type] += 1
    return dict(sorted(h.items()))


def condense(blocks):
    """One entry per distinct pattern: the data operand lines and node names left out,
    identical blocks (the steps of an unrolled loop, ...) counted once with their names."""
    import re
    groups = {}
    for block in blocks:
        head = block[0]
        m = re.match(r"\[(.*?)\] (\S+) (.*?)  out=(\S+)(.*)", head)
        where, op, name, out, attrs = m.groups() if m else ("?", "?", head, "", "")
        body = [ln.strip() for ln in block[1:] if ": data (" not in ln]
        key = (where, op, out, attrs, tuple(body))
        groups.setdefault(key, []).append(name)
    out_lines = []
    for (where, op, out, attrs, body), names in groups.items():
        who = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} alike)"
        out_lines.append(f"- [{where}] {op} {who} out={out}{attrs}")
        out_lines.extend(f"    {ln}" for ln in body)
    return out_lines


def survey(path, condensed=False):
    m = onnx.load(path)
    s = Survey(m)
    lines = [f"=== {path}",
             f"producer={m.producer_name} {m.producer_version} ir={m.ir_version} opsets="
             + ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in m.opset_import),
             "inputs: " + ", ".join(i.name + fmt_shape(Scope(m.graph).shapes.get(i.name, []))
                                     for i in m.graph.input
                                     if i.name not in {t.name for t in m.graph.initializer}),
             "initializers: " + ", ".join(f"{t.name}{fmt_shape(t.dims)}"
                                           for t in m.graph.initializer),
             f"ops: {op_histogram(m.graph)}"]
    if condensed:
        lines = [ln for ln in lines if not ln.startswith("initializers: ")]
        lines.append("initializers (weights): " + ", ".join(
            f"{t.name}{fmt_shape(t.dims)}" for t in m.graph.initializer if len(t.dims) >= 1
            and int(np.prod(t.dims)) > 4))
    blocks = s.walk(s.model.graph, lines=[])
    if condensed:
        lines.extend(condense(blocks))
    else:
        for b in blocks:
            lines.extend(b)
    return "\n".join(lines)


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    condensed = "--condensed" in argv
    for p in [a for a in argv if a != "--condensed"]:
        print(survey(p, condensed))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
