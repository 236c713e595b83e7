"""Einsum with a constant weight (issue 27, pattern 7): Flax's nnx.Einsum and jax2onnx's
dot_general write a dense layer as Einsum('btd,dh->bth', x, W), followed by the bias Add; a
head through nnx.Embed.attend as Einsum('abc,cd->abd', x, Transpose(table)).

Checked without onnx_lsuv: the output after the bias has unit variance (float64, the test's
own ORT session), the weight as the node reads it is orthonormal up to scale in the view the
equation gives (rows: the weight's labels kept in the output; columns: those summed), the nodes
are unchanged and only the layer's weight and bias changed. Einsums that are no dense layer
are reported as not initialised, with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnx_lsuv import lsuv_init
from onnx_lsuv.layouts import WeightLayout
from onnx_lsuv.match import match_parameters

from conftest import make_model, output_values, rand
from independent import orthonormal_up_to_scale

TOL = 0.1
N, T, D = 16, 5, 12


def einsum_view(equation: str, w: np.ndarray) -> np.ndarray:
    """(1, units, fan-in) view of an Einsum's second operand, from the equation alone."""
    weight, out = equation.split(",")[1].split("->")
    rows = [c for c in out if c in weight]
    cols = [c for c in weight if c not in out]
    w = np.transpose(w, [weight.index(c) for c in rows + cols])
    return w.reshape(1, int(np.prod(w.shape[:len(rows)])), -1)


def einsum_layer(equation: str, w_shape, b_shape, x_shape, transpose=None):
    """x -> Einsum(x, W) -> Add(bias) as jax2onnx writes it (the weight through a Transpose
    of the stored table for ``transpose``), then a Relu so the layer's output is not a graph
    output."""
    nodes = []
    w = "w"
    if transpose is not None:
        nodes.append(helper.make_node("Transpose", ["table"], ["w_t"], perm=transpose))
        w = "w_t"
    nodes += [helper.make_node("Einsum", ["x", w], ["mid"], name="einsum", equation=equation),
              helper.make_node("Add", ["mid", "b"], ["out"]),
              helper.make_node("Relu", ["out"], ["y"])]
    stored = rand(*w_shape, seed=1)
    inits = {("table" if transpose is not None else "w"):
             stored.transpose(np.argsort(transpose)) if transpose is not None else stored,
             "b": np.random.default_rng(2).normal(0.5, 0.3, b_shape).astype(np.float32)}
    model = make_model(nodes, [("x", ["N", *x_shape[1:]])], [("y", None)], inits)
    return model, {"x": 2 * rand(*x_shape, seed=3)}


CASES = [  # equation, weight shape (as the node reads it), bias shape, x shape
    ("btd,dh->bth", (D, 8), (8,), (N, T, D)),  # nnx.Einsum
    ("btd,dnh->btnh", (D, 2, 4), (2, 4), (N, T, D)),  # heads: units on the last two axes
    ("btd,dh->bht", (D, 8), (8, 1), (N, T, D)),  # units in the middle (the rank is known)
    ("...d,dh->...h", (D, 8), (8,), (N, T, D)),  # an ellipsis in the data and the output
    ("bd,hd->bh", (8, D), (8,), (N, D)),  # the units first in the weight
    ("btcd,cdh->bth", (3, 4, 8), (8,), (N, T, 3, 4)),  # a fan-in over two labels
]


@pytest.mark.parametrize("equation, w_shape, b_shape, x_shape", CASES,
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize("keep_bias", [False, True])
def test_an_einsum_with_a_constant_weight_is_a_dense_layer(equation, w_shape, b_shape, x_shape,
                                                           keep_bias):
    model, feeds = einsum_layer(equation, w_shape, b_shape, x_shape)
    before = np.var(output_values(model, feeds, ["out"])[0].astype(np.float64))
    result = lsuv_init(model, feeds, provider="cpu", keep_bias=keep_bias)
    rep = result.report
    assert [(r.name, r.op) for r in rep.layers] == [("einsum", "Einsum")], rep.table()
    assert not rep.skipped and rep.converged, rep.table()
    (out,) = output_values(result.model, feeds, ["out"])
    assert abs(np.var(out.astype(np.float64)) - 1) < TOL, (before, rep.table())
    assert abs(before - 1) >= TOL
    new = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert orthonormal_up_to_scale(einsum_view(equation, new["w"]))
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(new["b"], old["b"]) == keep_bias
    assert keep_bias or not new["b"].any()
    assert [n.SerializeToString() for n in result.model.graph.node] == \
        [n.SerializeToString() for n in model.graph.node]
    assert [(t.name, list(t.dims)) for t in result.model.graph.initializer] == \
        [(t.name, list(t.dims)) for t in model.graph.initializer]


def test_a_head_through_a_transposed_table_is_written_back_through_the_transpose():
    """nnx.Embed.attend alone (the table read by nothing else): a target, its stored table
    (vocab, features) written so that the Transpose gives the orthonormal weight; the way
    back maps it to nnx.Embed's embedding and nnx.Einsum's kernel as they are."""
    model, feeds = einsum_layer("abc,cd->abd", (D, 20), (20,), (N, T, D), transpose=[1, 0])
    result = lsuv_init(model, feeds, provider="cpu")
    assert [r.op for r in result.report.layers] == ["Einsum"], result.report.table()
    (out,) = output_values(result.model, feeds, ["out"])
    assert abs(np.var(out.astype(np.float64)) - 1) < TOL
    (w,) = output_values(result.model, feeds, ["w_t"])
    assert orthonormal_up_to_scale(einsum_view("abc,cd->abd", w))
    table = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                       if t.name == "table"))
    assert np.array_equal(table, w.T)
    params = {"emb.embedding": numpy_helper.to_array(model.graph.initializer[0]),
              "head.bias": numpy_helper.to_array(model.graph.initializer[1])}
    matched = match_parameters(model, result.weights, params)
    assert matched.complete, matched.summary()
    assert np.array_equal(matched.params["emb.embedding"], table)


REFUSED = [  # equation, weight shape, x shape, what the reason says
    ("bd,bdh->bh", (N, D, 8), (N, D), "batch-like label on the weight"),
    ("btd,dhk->bth", (D, 8, 3), (N, T, D), "summed over the weight alone"),
    ("btd,dnh->nbth", (D, 2, 4), (N, T, D), "not adjacent"),
    ("btd,dnh->bnht", (D, 2, 4), (N, T, D), "not the output's last"),
    ("...d,dh->h...", (D, 8), (N, T, D), "rank is not known"),
    ("btd,dd->btd", (D, D), (N, T, D), "a label repeats"),
]


@pytest.mark.parametrize("equation, w_shape, x_shape, why", REFUSED, ids=[r[0] for r in REFUSED])
def test_an_einsum_that_is_no_dense_layer_is_reported_not_initialised(equation, w_shape,
                                                                      x_shape, why):
    nodes = [helper.make_node("Einsum", ["x", "w"], ["y"], name="einsum", equation=equation)]
    model = make_model(nodes, [("x", ["N", *x_shape[1:]])], [("y", None)],
                       {"w": rand(*w_shape, seed=1)})
    rep = lsuv_init(model, {"x": rand(*x_shape, seed=3)}, provider="cpu").report
    assert not rep.layers
    assert [s["name"] for s in rep.not_initialised] == ["einsum"], rep.skipped
    assert why in rep.not_initialised[0]["reason"] and equation in \
        rep.not_initialised[0]["reason"]


def test_an_einsum_whose_constant_is_the_first_operand_is_reported():
    nodes = [helper.make_node("Einsum", ["w", "x"], ["y"], name="einsum",
                              equation="dh,btd->bth")]
    model = make_model(nodes, [("x", ["N", T, D])], [("y", None)], {"w": rand(D, 8, seed=1)})
    rep = lsuv_init(model, {"x": rand(N, T, D, seed=3)}, provider="cpu").report
    assert not rep.layers and "first operand" in rep.not_initialised[0]["reason"]


@pytest.mark.parametrize("perm, units", [((1, 0), 1), ((1, 2, 0), 2), ((2, 0, 1), 1)])
def test_the_einsum_layout_round_trips_bit_for_bit(perm, units):
    shape = (3, 4, 5)[:len(perm)]
    layout = WeightLayout("Einsum", shape, perm=perm, unit_axes=units)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    m = layout.to_matrices(w)
    dims = [shape[a] for a in perm]
    assert m.shape == (1, int(np.prod(dims[:units])), int(np.prod(dims[units:])))
    assert np.array_equal(m[0], w.transpose(perm).reshape(m.shape[1:]))
    back = layout.from_matrices(m)
    assert back.flags.c_contiguous and np.array_equal(back, w)
