"""The measuring rewrites: where layers are read, and how exact the in-graph statistics are."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_lsuv.graph import GraphIndex
from onnx_lsuv.layers import find_layers
from onnx_lsuv.measure_graph import find_tap, normalizing_model, stats_model

import models
from conftest import output_variances


def run(model, feeds, names):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [float(v) for v in sess.run(names, feeds)]


def test_layers_are_read_after_an_invertible_batchnorm():
    model, _, _ = models.conv_bn()
    index = GraphIndex(model.graph)
    taps = {lay.name: find_tap(index, lay, lay.first_use) for lay in find_layers(model).layers}
    assert taps["conv1"].tensor == "n1" and taps["conv2"].tensor == "n2"
    assert taps["fc"].tensor == "nf"
    zero, _, _ = models.conv_bn(zero_gamma=True)
    index = GraphIndex(zero.graph)
    by_name = {lay.name: lay for lay in find_layers(zero).layers}
    conv2 = by_name["conv2"]
    assert find_tap(index, conv2, conv2.first_use).tensor == "y2"  # gamma 0: not invertible


@pytest.mark.parametrize("kind", sorted(models.ALL))
def test_in_graph_variances_match_numpy_float64(kind):
    model, feeds, outputs = models.ALL[kind]()
    layers = find_layers(model).layers
    measuring, names = stats_model(model, layers)
    got = run(measuring, feeds, names)
    want = output_variances(model, feeds, [lay.output for lay in layers])
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_large_tensor_statistics_stay_accurate_in_float32():
    # 4 M elements per channel group, mean far from zero: the two-stage sums keep 1e-4.
    from onnx import helper

    from conftest import make_model

    x = (np.random.default_rng(0).standard_normal((32, 4, 256, 128)) * 0.5 + 2.0)
    x = x.astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[1, 1])],
                       [("x", ["N", 4, 256, 128])], [("y", None)],
                       {"w": np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1)})
    layers = find_layers(model).layers
    measuring, names = stats_model(model, layers)
    (got,) = run(measuring, {"x": x}, names)
    assert abs(got - np.var(x, dtype=np.float64)) / np.var(x, dtype=np.float64) < 1e-4


def test_normalizing_copy_keeps_the_users_model_untouched():
    model, _, _ = models.conv_bn()
    snapshot = model.SerializeToString()
    copy, outs = normalizing_model(model, find_layers(model).layers, {}, 1.0, 0.1)
    assert model.SerializeToString() == snapshot
    assert len(copy.graph.output) == 2 * len(outs)
    onnx.checker.check_model(model)


# The one-pass solve's statistics: float32 sums over one axis, exported, and from them a
# float64 variance with a bound on its error (measure_graph.bounded_variance). Checked here
# against the test's own float64 measurement of the same outputs, on ordinary graphs and on
# the hard cases of float32 statistics.
def _saturated_tanh():
    """Conv -> Tanh driven deep into saturation by a bias of 3 -> Conv: the second conv
    reads values all near 0.995, so its output's mean dwarfs its spread."""
    from onnx import helper

    from conftest import make_model, rand

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["y1"], ["t1"]),
             helper.make_node("Conv", ["t1", "w2", "b2"], ["y2"], name="conv2",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = {"w1": rand(8, 4, 3, 3, seed=1) * 0.05, "b1": np.full(8, 3.0, np.float32),
             "w2": rand(8, 8, 3, 3, seed=3), "b2": rand(8, seed=4)}
    return make_model(nodes, [("x", ["N", 4, 6, 6])], [("y2", None)], inits), \
        {"x": rand(16, 4, 6, 6, seed=9)}


def _bounded_cases():
    from test_verdict import bn_tapped_conv

    cases = {name: getattr(models, name)()[:2] for name in
             ("conv_chain", "conv_bn", "gemm_mlp", "residual_block", "conv_transpose")}
    model, x = bn_tapped_conv(300.0)
    cases["bn_mean_300"] = (model, {"x": x})
    cases["saturated_tanh"] = _saturated_tanh()
    return cases


def _bounded_variances(model, feeds):
    """Each layer's (variance, bound) from the one-pass graph with an infinite tolerance
    (every factor 1: the outputs are the model's own), and the layers."""
    from onnx_lsuv.measure_graph import bounded_variance

    layers = find_layers(model).layers
    copy, outs = normalizing_model(model, layers, {}, 1.0, float("inf"), exact=False,
                                   after=True, bounded=True)
    assert all(o.partials and o.var_after is None for o in outs)  # the new path, every layer
    names = [x for o in outs for p in o.partials for x in (p.s1, p.s2, p.size)]
    names += [o.scale for o in outs]
    sess = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = dict(zip(names, sess.run(names, feeds)))
    return layers, [bounded_variance(o.partials, fetched, lay.layout.output_units,
                                     len(lay.blocks), np.atleast_1d(fetched[o.scale]))
                    for lay, o in zip(layers, outs)]


@pytest.mark.parametrize("factor", [1.0, 1e18, 1e-20])
@pytest.mark.parametrize("case", ["conv_chain", "conv_bn", "gemm_mlp", "residual_block",
                                  "conv_transpose", "bn_mean_300", "saturated_tanh"])
def test_bounded_float32_statistics_are_within_their_bound_of_float64(case, factor):
    import independent

    model, feeds = _bounded_cases()[case]
    feeds = {k: (v * factor).astype(np.float32) for k, v in feeds.items()}
    layers, got = _bounded_variances(model, feeds)
    targets, _ = independent.find_targets(model)
    truth = independent.pooled_variances(model, feeds, targets)
    assert len(truth) == len(got)
    for lay, (var, err), want in zip(layers, got, truth):
        (var,), (err,) = var, err
        if np.isfinite(want) and np.isfinite(var) and np.isfinite(err):
            assert abs(var - want) <= err * (1 + 1e-9), (lay.name, var, want, err)
        else:  # an overflow: never a finite variance with a finite bound that is wrong
            assert not (np.isfinite(var) and np.isfinite(err)), (lay.name, var, want, err)
    if factor == 1.0 and case not in ("bn_mean_300", "saturated_tanh"):  # a useful bound
        assert all(err[0] <= 1e-5 * var[0] for var, err in got), got


def test_a_large_mean_makes_the_bound_large_and_the_solve_measure_again():
    """A BatchNormalization tap with running mean 300 (y = (t + 300 a) / a) and a tanh
    saturated to 0.995: the float32 sums cannot be trusted; the one-pass solve says so and
    the float64 re-measurement judges them, as the test's own float64 measurement does."""
    from onnx_lsuv import lsuv_init
    from onnx_lsuv.strategies import trusted

    import independent

    for model, feeds in (_bounded_cases()["bn_mean_300"], _saturated_tanh()):
        layers, got = _bounded_variances(model, feeds)
        assert not all(trusted(var, err, 1.0, 0.1) for var, err in got), got
        result = lsuv_init(model, feeds, provider="cpu", init="rescale", keep_bias=True)
        assert result.report.measured_in == "re-measure"
        targets, _ = independent.find_targets(result.model)
        measured = independent.pooled_variances(result.model, feeds, targets)
        for rec, want in zip(result.report.layers, measured):
            assert rec.var_after == pytest.approx(want, rel=1e-6), result.report.table()


@pytest.mark.parametrize("factor", [1.0, 1e18, 1e-20])
def test_the_one_pass_variances_are_the_written_models_at_any_scale(factor):
    """lsuv_init's one-pass statistics (bounded float32 sums) against the test's float64
    measurement of the written model, with the data scaled to the edges of float32."""
    from onnx_lsuv import lsuv_init

    import independent

    model, feeds, _ = models.conv_bn()
    feeds = {k: (v * factor).astype(np.float32) for k, v in feeds.items()}
    result = lsuv_init(model, feeds, provider="cpu")
    targets, _ = independent.find_targets(result.model)
    measured = independent.pooled_variances(result.model, feeds, targets)
    for rec, want in zip(result.report.layers, measured):
        assert rec.var_after == pytest.approx(want, rel=1e-4), result.report.table()
        assert (rec.status == "converged") == (abs(want - 1) < 0.1), result.report.table()
    if factor == 1.0:
        assert result.report.measured_in == "one pass" and result.report.converged
