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
