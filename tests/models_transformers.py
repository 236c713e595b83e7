"""Transformer graphs as the exporters other than PyTorch's plain modules write them (issue 28:
roles in any exporter's graph), each with the role every target layer has.

Two kinds of builder:

* ``transformer(...)``: one small transformer built by hand with onnx.helper, in the shape that
  one exporter writes (the real exports' nodes were dumped to copy them): PyTorch's
  TorchScript / dynamo exports of Hugging Face models (BERT: separate q/k/v MatMul + Add,
  post-LN; GPT-2: Conv1D as Gemm on a 2-D Reshape, fused c_attn cut by a Split; ViT: a Conv
  patch embedding, a class token Concat and a position Add), tf2onnx's Keras
  MultiHeadAttention (q/k/v MatMul -> Reshape -> Add of a [heads, head_dim] bias, the q.k^T
  Einsum decomposed into Unsqueeze/Transpose/Reshape/MatMul/Reshape/Squeeze, LayerNorm
  decomposed around GlobalAveragePool), jax2onnx's Flax nnx (Gemm on 2-D Reshapes, LayerNorm
  as E[x^2] - E[x]^2), and ONNX Runtime's transformer optimiser (com.microsoft ``Attention``
  with the fused qkv weight inside, ``MultiHeadAttention`` fed by separate q/k/v MatMuls with
  their biases inside).
* ``hf_bert`` / ``hf_gpt2`` / ``hf_vit``: the Hugging Face models themselves, built from
  small configs (no download), every bias and LayerNorm parameter non-default, for the real
  exporters; ``HF_ROLES`` says each parameter's role.

Roles (the tests' own names, independent of onnx_lsuv): ``embedding`` (the layer that writes the
residual stream), ``q``, ``k``, ``v``, ``qkv`` (fused), ``attn_out`` and ``mlp_out`` (a
branch's last layer), ``mlp_in``, ``head`` (the last layer before the graph output); a target
not listed has none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import IR_VERSION

D, HEADS, DH, T, F, C, V = 16, 2, 8, 8, 32, 5, 50  # width, heads, head dim, tokens, MLP, ...
BATCH = 16
MS = "com.microsoft"


@dataclass
class Case:
    """A hand-built transformer and what the test knows about it.

    Attributes:
        model: The graph.
        feeds: A batch for it.
        roles: Target node name -> role (see the module's docstring).
        norm: Per block, "pre" or "post" (where its LayerNorms sit).
        softmax: The attention Softmax nodes' names, in block order (observable logits).
        logits: The logits of each of them, in order: the scaled q.k^T before any mask.
        residual: The residual Add nodes' names (stream + branch), in order.
        fused: Names of fused attention nodes (their logits are inside the op).
    """

    model: onnx.ModelProto
    feeds: dict
    roles: dict[str, str]
    norm: list[str] = field(default_factory=list)
    softmax: list[str] = field(default_factory=list)
    logits: list[str] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)


class _Graph:
    """Collects nodes and initializers with unique names; weights are seeded draws."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self.name(hint)
        self.inits[name] = np.asarray(value, dtype=dtype)
        return name

    def weight(self, *shape, hint: str = "w", scale: float | None = None) -> str:
        scale = shape[0] ** -0.5 if scale is None else scale
        return self.const(self.rng.normal(0, scale, shape), hint)

    def bias(self, *shape, hint: str = "b") -> str:
        return self.const(self.rng.normal(0, 0.5, shape), hint)  # non-zero biases

    def gamma(self, *shape) -> str:
        return self.const(self.rng.uniform(0.5, 1.5, shape), "gamma")

    def op(self, op_type: str, inputs, name: str | None = None, outputs: int = 1,
           domain: str = "", **attrs):
        name = name or self.name(op_type)
        outs = [f"{name}_out{k}" if outputs > 1 else f"{name}_out" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name,
                                           domain=domain or None, **attrs))
        return outs if outputs > 1 else outs[0]


def _dense(g: _Graph, x: str, din: int, dout: int, name: str, style: str,
           bias: bool = True) -> str:
    """A Linear on [B, T, din] as the exporter writes it; the target node is called ``name``.

    matmul: MatMul(x, W) -> Add (PyTorch TorchScript, tf2onnx's Dense);
    matmul_bias_first: the same with Add(b, MatMul) (PyTorch TorchScript's argument order);
    gemm2d: Reshape(x, [-1, din]) -> Gemm(W, b) -> Reshape([-1, T, dout]) (GPT-2's Conv1D
    under both torch exporters, jax2onnx's nnx.Linear)."""
    w = g.weight(din, dout, hint=f"{name}.weight")
    if style == "gemm2d":
        x2 = g.op("Reshape", [x, g.const([-1, din], "shape", np.int64)])
        ins = [x2, w] + ([g.bias(dout, hint=f"{name}.bias")] if bias else [])
        y = g.op("Gemm", ins, name=name)
        return g.op("Reshape", [y, g.const([-1, T, dout], "shape", np.int64)])
    y = g.op("MatMul", [x, w], name=name)
    if not bias:
        return y
    b = g.bias(dout, hint=f"{name}.bias")
    return g.op("Add", [b, y] if style == "matmul_bias_first" else [y, b])


def _layernorm(g: _Graph, x: str, style: str) -> str:
    """LayerNorm over the last axis: the op (opset 17), or decomposed as an exporter writes it.

    torch: ReduceMean -> Sub -> Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Div -> Mul -> Add
    (TorchScript below opset 17); tf2onnx: GlobalAveragePool for both means, Neg, Reciprocal of
    Sqrt, gamma folded into one Mul read twice; jax2onnx: E[x^2] - E[x]^2 clamped by Max."""
    gamma, beta = g.gamma(D), g.bias(D, hint="beta")
    if style == "op":
        return g.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
    eps = g.const(1e-5, "eps")
    if style == "torch":
        mean = g.op("ReduceMean", [x], axes=[-1])
        d = g.op("Sub", [x, mean])
        var = g.op("ReduceMean", [g.op("Pow", [d, g.const(2.0, "two")])], axes=[-1])
        n = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [var, eps])])])
        return g.op("Add", [g.op("Mul", [n, gamma]), beta])
    if style == "tf2onnx":
        g.inits[gamma] = g.inits[gamma].reshape(1, 1, D)
        g.inits[beta] = g.inits[beta].reshape(1, 1, D)
        mean = g.op("GlobalAveragePool", [x])
        neg = g.op("Neg", [mean])
        d = g.op("Sub", [x, mean])
        var = g.op("GlobalAveragePool", [g.op("Mul", [d, d])])
        r = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, eps])])])
        scale = g.op("Mul", [r, gamma])
        shift = g.op("Add", [g.op("Mul", [neg, scale]), beta])
        return g.op("Add", [g.op("Mul", [x, scale]), shift])
    if style == "jax2onnx":
        mean = g.op("ReduceMean", [x], axes=[2], keepdims=1)
        centred = g.op("Sub", [x, mean])
        second = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[2], keepdims=1)
        var = g.op("Sub", [second, g.op("Mul", [mean, mean])])
        var = g.op("Max", [var, g.const(0.0, "zero")])
        n = g.op("Div", [centred, g.op("Sqrt", [g.op("Add", [var, eps])])])
        return g.op("Add", [g.op("Mul", [n, gamma]), beta])
    raise ValueError(style)


def _heads(g: _Graph, x: str, perm: list[int]) -> str:
    """[B, T, D] -> [B, T, H, dh] -> Transpose(perm)."""
    r = g.op("Reshape", [x, g.const([0, 0, HEADS, DH], "shape", np.int64)])
    return g.op("Transpose", [r], perm=perm)


def _core(g: _Graph, q: str, k: str, v: str, b: int, mask: bool, case: Case) -> str:
    """softmax(q k^T * scale [+ mask]) v over heads, then heads merged back to [B, T, D]:
    PyTorch's eager attention (and jax2onnx's dot_product_attention) as exported."""
    logits = g.op("MatMul", [_heads(g, q, [0, 2, 1, 3]), _heads(g, k, [0, 2, 3, 1])])
    scaled = g.op("Mul", [logits, g.const(DH ** -0.5, "scale")])
    case.logits.append(scaled)
    if mask:  # GPT-2: a causal mask of 0 / -inf-like values added before the Softmax
        causal = np.triu(np.full((T, T), -1e4, np.float32), 1)[None, None]
        scaled = g.op("Add", [scaled, g.const(causal, "mask")])
    p = g.op("Softmax", [scaled], name=f"softmax{b}", axis=-1)
    case.softmax.append(p.removesuffix("_out"))
    o = g.op("MatMul", [p, _heads(g, v, [0, 2, 1, 3])])
    o = g.op("Transpose", [o], perm=[0, 2, 1, 3])
    return g.op("Reshape", [o, g.const([0, 0, D], "shape", np.int64)])


def _core_tf2onnx(g: _Graph, q: str, k: str, v: str, b: int, case: Case) -> str:
    """tf2onnx's decomposition of Keras MultiHeadAttention's two Einsums ('aecd,abcd->acbe'
    and 'acbe,aecd->abcd') on [B, T, H, dh]: Unsqueeze, Transpose, Reshape to [B*H, ., .],
    MatMul, Reshape back and Squeeze; the 1/sqrt(dh) Mul after the logits' Squeeze."""
    def to_bh(x, perm, shape):
        u = g.op("Unsqueeze", [x, g.const([4], "axes", np.int64)])
        return g.op("Reshape", [g.op("Transpose", [u], perm=perm),
                                g.const(shape, "shape", np.int64)])

    qr = to_bh(q, [0, 2, 1, 3, 4], [-1, T, DH])  # [B*H, T, dh]
    kr = g.op("Transpose", [to_bh(k, [0, 2, 1, 3, 4], [-1, T, DH])], perm=[0, 2, 1])
    logits = g.op("Reshape", [g.op("MatMul", [qr, kr]),
                              g.const([-1, HEADS, T, T, 1], "shape", np.int64)])
    logits = g.op("Squeeze", [logits, g.const([4], "axes", np.int64)])
    scaled = g.op("Mul", [logits, g.const(DH ** -0.5, "scale")])
    case.logits.append(scaled)
    p = g.op("Softmax", [scaled], name=f"softmax{b}", axis=-1)
    case.softmax.append(p.removesuffix("_out"))
    pr = g.op("Reshape", [g.op("Unsqueeze", [p, g.const([4], "axes", np.int64)]),
                          g.const([-1, T, T], "shape", np.int64)])
    vr = g.op("Transpose", [to_bh(v, [0, 2, 1, 3, 4], [-1, T, DH])], perm=[0, 2, 1])
    o = g.op("MatMul", [pr, g.op("Transpose", [vr], perm=[0, 2, 1])])  # [B*H, T, dh]
    o = g.op("Reshape", [o, g.const([-1, HEADS, T, DH, 1], "shape", np.int64)])
    o = g.op("Squeeze", [o, g.const([4], "axes", np.int64)])
    o = g.op("Transpose", [o], perm=[0, 2, 1, 3])
    return g.op("Reshape", [o, g.const([-1, T, D], "shape", np.int64)])


def _attention(g: _Graph, x: str, b: int, qkv: str, dense: str, mask: bool,
               case: Case) -> str:
    """The attention branch up to (not including) its out-projection; records the roles."""
    name = f"blk{b}."
    if qkv in ("split", "slice"):  # one projection to 3D, cut into q, k, v
        fused = _dense(g, x, D, 3 * D, name + "qkv", dense)
        case.roles[name + "qkv"] = "qkv"
        if qkv == "split":
            q, k, v = g.op("Split", [fused, g.const([D, D, D], "split", np.int64)],
                           outputs=3, axis=2)
        else:
            def cut(a):
                return g.op("Slice", [fused, g.const([a], "s", np.int64),
                                      g.const([a + D], "e", np.int64),
                                      g.const([2], "ax", np.int64)])
            q, k, v = cut(0), cut(D), cut(2 * D)
        return _core(g, q, k, v, b, mask, case)
    if qkv == "attention_op":  # ORT's fused Attention: the qkv weight and bias inside
        w = g.weight(D, 3 * D, hint=name + "qkv.weight")
        bias = g.bias(3 * D, hint=name + "qkv.bias")
        out = g.op("Attention", [x, w, bias], name=name + "attention", domain=MS,
                   num_heads=HEADS, unidirectional=int(mask))
        case.fused.append(name + "attention")
        return out
    if qkv == "mha_op":  # ORT's MultiHeadAttention: q, k, v MatMuls, their biases inside
        q, k, v = (_dense(g, x, D, D, name + p, "matmul", bias=False) for p in "qkv")
        case.roles.update({name + p: p for p in "qkv"})
        bias = g.bias(3 * D, hint=name + "qkv.bias")
        out = g.op("MultiHeadAttention", [q, k, v, bias], name=name + "mha", domain=MS,
                   num_heads=HEADS)
        case.fused.append(name + "mha")
        return out
    if qkv == "onnx_attention":  # ONNX's Attention (opset 23) on projected q, k, v
        q, k, v = (_dense(g, x, D, D, name + p, dense) for p in "qkv")
        case.roles.update({name + p: p for p in "qkv"})
        out = g.op("Attention", [q, k, v], name=name + "attention", q_num_heads=HEADS,
                   kv_num_heads=HEADS)
        case.fused.append(name + "attention")
        return out
    if qkv == "tf2onnx":  # q/k/v: MatMul [D, D] -> Reshape [B, T, H, dh] -> Add [H, dh]
        heads = []
        for p in "qkv":
            y = g.op("MatMul", [x, g.weight(D, D, hint=f"{name}{p}.weight")], name=name + p)
            y = g.op("Reshape", [y, g.const([-1, T, HEADS, DH], "shape", np.int64)])
            heads.append(g.op("Add", [y, g.bias(HEADS, DH, hint=f"{name}{p}.bias")]))
            case.roles[name + p] = p
        return _core_tf2onnx(g, *heads, b, case)
    q, k, v = (_dense(g, x, D, D, name + p, dense) for p in "qkv")
    case.roles.update({name + p: p for p in "qkv"})
    return _core(g, q, k, v, b, mask, case)


def _gelu_tanh(g: _Graph, x: str) -> str:
    """GELU (tanh form) as PyTorch and jax2onnx write it."""
    cube = g.op("Mul", [g.op("Pow", [x, g.const(3.0, "three")]), g.const(0.044715, "c")])
    inner = g.op("Mul", [g.op("Add", [x, cube]), g.const(np.sqrt(2 / np.pi), "c")])
    half = g.op("Mul", [x, g.const(0.5, "half")])
    return g.op("Mul", [half, g.op("Add", [g.op("Tanh", [inner]), g.const(1.0, "one")])])


def _embed(g: _Graph, kind: str, dense: str) -> tuple[str, tuple]:
    """The layer that writes the residual stream, plus its position embedding; returns the
    stream and the graph input (name, shape, elem type)."""
    if kind == "tokens":  # Gather(table, ids) + Gather(pos table, 0..T-1)
        tok = g.op("Gather", [g.weight(V, D, hint="wte", scale=0.5), "ids"], name="embed")
        pos = g.op("Gather", [g.weight(T + 4, D, hint="wpe", scale=0.2),
                              g.const(np.arange(T), "positions", np.int64)])
        return g.op("Add", [tok, pos]), ("ids", ["N", T], TensorProto.INT64)
    if kind == "patch":  # ViT: Conv stride = patch -> Flatten(2) -> Transpose -> cls ++ -> +pos
        y = g.op("Conv", ["x", g.weight(D, 3, 4, 4, hint="patch.weight", scale=0.15),
                          g.bias(D, hint="patch.bias")], name="embed", kernel_shape=[4, 4],
                 strides=[4, 4])
        y = g.op("Reshape", [y, g.const([0, D, -1], "shape", np.int64)])
        y = g.op("Transpose", [y], perm=[0, 2, 1])  # [B, T - 1, D]
        n = g.op("Slice", [g.op("Shape", ["x"]), g.const([0], "s", np.int64),
                           g.const([1], "e", np.int64)])
        cls = g.op("Expand", [g.const(g.rng.normal(0, 0.02, (1, 1, D)), "cls"),
                              g.op("Concat", [n, g.const([1, D], "s", np.int64)], axis=0)])
        y = g.op("Concat", [cls, y], axis=1)
        return g.op("Add", [y, g.weight(1, T, D, hint="pos", scale=0.2)]), \
            ("x", ["N", 3, 4, 4 * (T - 1)], TensorProto.FLOAT)
    y = _dense(g, "x", 12, D, "embed", dense)  # Keras / Flax: a Linear on the features
    return g.op("Add", [y, g.weight(1, T, D, hint="pos", scale=0.3)]), \
        ("x", ["N", T, 12], TensorProto.FLOAT)


def transformer(embed: str = "tokens", qkv: str = "separate", norm: str = "pre",
                ln: str = "op", dense: str = "matmul", mask: bool = False, blocks: int = 2,
                head: str = "pool", opset: int = 17, seed: int = 0) -> Case:
    """A small transformer (width 16, 2 heads, 8 tokens, MLP 32) written as one exporter writes
    it.

    Args:
        embed: "tokens" (Gather of a table + position Gather), "patch" (ViT's Conv), "dense"
            (a Linear on features + a position table). Defaults to "tokens".
        qkv: "separate" (q, k, v Linears), "split" / "slice" (one fused 3D projection cut by a
            Split / three Slices), "tf2onnx" (Keras MultiHeadAttention through tf2onnx),
            "attention_op" / "mha_op" (ONNX Runtime's contrib ops), "onnx_attention"
            (ONNX's Attention, opset 23). Defaults to "separate".
        norm: "pre" (LN -> branch -> Add) or "post" (branch -> Add -> LN, and an LN on the
            embeddings as BERT has). Defaults to "pre".
        ln: LayerNorm "op" or decomposed: "torch", "tf2onnx", "jax2onnx". Defaults to "op".
        dense: see ``_dense``. Defaults to "matmul".
        mask: add GPT-2's causal mask before the Softmax. Defaults to False.
        blocks: how many blocks. Defaults to 2.
        head: "pool" (mean over tokens, then a Linear to C classes; pre-LN adds a final
            LN), "first" (the first token, as ViT / BERT's classifiers), "tokens" (an LM head
            on every token). Defaults to "pool".
        opset: the default domain's opset. Defaults to 17.
        seed: weights' seed. Defaults to 0.
    """
    g = _Graph(seed)
    case = Case(None, {}, {})
    s, inp = _embed(g, embed, dense)
    if norm == "post":  # BERT: a LayerNorm on the embeddings' sum sets the stream's scale,
        s = _layernorm(g, s, ln)  # so the embedding has no stream-writer role
    else:
        case.roles["embed"] = "embedding"
    for b in range(blocks):
        x = _layernorm(g, s, ln) if norm == "pre" else s
        a = _attention(g, x, b, qkv, dense, mask, case)
        a = _dense(g, a, D, D, f"blk{b}.attn_out", dense)
        s = g.op("Add", [s, a], name=f"blk{b}.res1")
        s = _layernorm(g, s, ln) if norm == "post" else s
        x = _layernorm(g, s, ln) if norm == "pre" else s
        h = _gelu_tanh(g, _dense(g, x, D, F, f"blk{b}.mlp_in", dense))
        h = _dense(g, h, F, D, f"blk{b}.mlp_out", dense)
        s = g.op("Add", [s, h], name=f"blk{b}.res2")
        s = _layernorm(g, s, ln) if norm == "post" else s
        case.norm.append(norm)
        case.residual += [f"blk{b}.res1", f"blk{b}.res2"]
        case.roles.update({f"blk{b}.attn_out": "attn_out", f"blk{b}.mlp_in": "mlp_in",
                           f"blk{b}.mlp_out": "mlp_out"})
    if norm == "pre":
        s = _layernorm(g, s, ln)
    if head == "tokens":
        out = _dense(g, s, D, V, "head", "matmul", bias=False)
    else:
        if head == "pool":
            s = g.op("ReduceMean", [s], axes=[1], keepdims=0)
        else:
            s = g.op("Gather", [s, g.const(0, "first", np.int64)], axis=1)
        out = g.op("Gemm", [s, g.weight(C, D, hint="head.weight"), g.bias(C, hint="head.bias")],
                   name="head", transB=1)
    case.roles["head"] = "head"
    opsets = [helper.make_opsetid("", opset)]
    if case.fused:
        opsets.append(helper.make_opsetid(MS, 1))
    graph = helper.make_graph(
        g.nodes, "transformer", [helper.make_tensor_value_info(*inp[:1], inp[2], inp[1])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                       ["N", T, V] if head == "tokens" else ["N", C])],
        initializer=[numpy_helper.from_array(v, k) for k, v in g.inits.items()])
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=IR_VERSION if opset < 23 else 11)
    if not case.fused or qkv == "onnx_attention":
        onnx.checker.check_model(model)
    case.model = model
    rng = np.random.default_rng(seed + 100)
    if inp[2] == TensorProto.INT64:
        case.feeds = {inp[0]: rng.integers(0, V, (BATCH, T)).astype(np.int64)}
    else:
        shape = [BATCH] + [d for d in inp[1][1:]]
        case.feeds = {inp[0]: rng.standard_normal(shape).astype(np.float32)}
    return case


# What each exporter's transformer looks like, hand-built (name -> transformer(...) keywords).
TWINS = {
    # PyTorch (TorchScript and dynamo) exports of Hugging Face models
    "hf_bert": dict(embed="tokens", qkv="separate", norm="post", dense="matmul_bias_first",
                    head="first"),
    "hf_gpt2_split": dict(embed="tokens", qkv="split", dense="gemm2d", mask=True,
                          head="tokens"),
    "hf_gpt2_slice": dict(embed="tokens", qkv="slice", dense="gemm2d", mask=True,
                          head="tokens"),
    "hf_vit": dict(embed="patch", qkv="separate", head="first"),
    "torch_decomposed_ln": dict(embed="patch", qkv="separate", ln="torch", head="first"),
    # tf2onnx on Keras MultiHeadAttention in a pre-LN block
    "tf2onnx_keras_mha": dict(embed="dense", qkv="tf2onnx", ln="tf2onnx"),
    # jax2onnx on Flax nnx.MultiHeadAttention in a pre-LN block
    "jax2onnx_flax_mha": dict(embed="dense", qkv="separate", ln="jax2onnx", dense="gemm2d"),
    # ONNX Runtime's transformer optimiser (contrib ops)
    "ort_attention": dict(embed="tokens", qkv="attention_op", norm="post", head="first"),
    "ort_mha": dict(embed="tokens", qkv="mha_op", norm="post", head="first"),
    # ONNX's own Attention op (opset 23)
    "onnx_attention": dict(embed="tokens", qkv="onnx_attention", head="first", opset=23),
}


def twin(name: str, **overrides) -> Case:
    return transformer(**{**TWINS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Hugging Face models built in code (transformers + torch; imported lazily by the callers)

# A parameter's role from its name in the Hugging Face model (the tests' ground truth).
HF_ROLES = [
    (r"(word_embeddings|wte|patch_embeddings\.projection)\.weight$", "embedding"),
    (r"(query|q_proj)\.weight$", "q"),
    (r"(key|k_proj)\.weight$", "k"),
    (r"(value|v_proj)\.weight$", "v"),
    (r"attn\.c_attn\.weight$", "qkv"),
    (r"(attention\.output\.dense|attn\.c_proj|attention\.o_proj)\.weight$", "attn_out"),
    (r"(intermediate\.dense|mlp\.c_fc|mlp\.fc1)\.weight$", "mlp_in"),
    (r"(\d\.output\.dense|mlp\.c_proj|mlp\.fc2)\.weight$", "mlp_out"),
    (r"(classifier|lm_head)\.weight$", "head"),
]


def hf_role(param: str) -> str | None:
    return next((role for pattern, role in HF_ROLES if re.search(pattern, param)), None)


def _randomise(module, seed: int) -> None:
    """Every bias ~ N(0, 0.5), every LayerNorm weight ~ U(0.5, 1.5): no exported zero or one
    (the exporters fold or share those), weights as the model initialised them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "LayerNorm" in name or "ln_" in name or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


class _Logits:
    """Wraps a Hugging Face model so that it returns its logits tensor only (GPT-2 gets an
    all-ones attention mask: without it transformers' packed-sequence check calls
    ``torch.diff``, which the TorchScript exporter cannot write)."""

    def __new__(cls, model, ones_mask: bool = False):
        import torch

        class Logits(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, x):
                if ones_mask:
                    return self.m(x, attention_mask=torch.ones_like(x), return_dict=False)[0]
                return self.m(x, return_dict=False)[0]

        return Logits().eval()


def hf_bert(seed: int = 0):
    """BertForSequenceClassification, 2 post-LN layers of width 16: (module, input ids)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=F, max_position_embeddings=T + 4, type_vocab_size=1, num_labels=C,
        attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config).eval()
    _randomise(model, seed)
    ids = torch.randint(0, V, (BATCH, T), generator=torch.Generator().manual_seed(seed + 1))
    return _Logits(model), ids


def hf_gpt2(seed: int = 0):
    """GPT2LMHeadModel, 2 pre-LN layers of width 16 (Conv1D, fused c_attn, tied head)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=HEADS,
                                     n_positions=T + 4, use_cache=False,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    _randomise(model, seed)
    ids = torch.randint(0, V, (BATCH, T), generator=torch.Generator().manual_seed(seed + 1))
    return _Logits(model, ones_mask=True), ids


def hf_vit(seed: int = 0):
    """ViTForImageClassification, 2 pre-LN layers of width 16 on 8x8 images, 4x4 patches."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=D,
                                    num_hidden_layers=2, num_attention_heads=HEADS,
                                    intermediate_size=F, num_labels=C,
                                    attn_implementation="eager")
    model = transformers.ViTForImageClassification(config).eval()
    _randomise(model, seed)
    x = torch.randn((BATCH, 3, 8, 8), generator=torch.Generator().manual_seed(seed + 1))
    return _Logits(model), x


def export_torch(module, x, dynamo: bool, path: str) -> onnx.ModelProto:
    """Export with TorchScript (opset 17) or dynamo (opset 18), batch dimension fixed."""
    import torch

    if dynamo:
        torch.onnx.export(module, (x,), path, dynamo=True, opset_version=18,
                          input_names=["x"], verbose=False)
    else:
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17,
                          input_names=["x"])
    return onnx.load(path)
