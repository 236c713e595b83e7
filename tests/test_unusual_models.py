"""Models that real exporters produce: dynamic dims, quantized or cast weights, subgraphs, dead
branches, batches of one, models without targets."""

import logging

import numpy as np
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnx_lsuv import lsuv_init
from onnx_lsuv.layers import find_layers
from onnx_lsuv_cli.main import lsuv_command

import models
from conftest import make_model, output_variances, rand


def test_symbolic_batch_and_spatial_dims_take_any_size():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="c", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", ["N", 3, "H", "W"])], [("y", None)],
                       {"w": rand(4, 3, 3, 3, seed=1)})
    for shape in ((16, 3, 5, 7), (2, 3, 11, 4)):
        x = rand(*shape, seed=2)
        result = lsuv_init(model, x, provider="cpu")
        assert abs(output_variances(result.model, {"x": x}, ["y"])[0] - 1) < 0.1


def test_batch_of_one_works_with_a_warning(caplog):
    model, feeds, outputs = models.conv_chain()
    x = feeds["x"][:1]
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        result = lsuv_init(model, x, provider="cpu")
    assert "1 samples" in caplog.text
    for v in output_variances(result.model, {"x": x}, outputs):
        assert abs(v - 1) < 0.1


def test_quantized_and_cast_weights_are_skipped_with_a_named_warning(caplog):
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("Gemm", ["x", "wd"], ["y1"], name="quantized_fc", transB=1),
        helper.make_node("Cast", ["wh"], ["wc"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["y1", "wc"], ["y2"], name="cast_fc", transB=1),
        helper.make_node("Gemm", ["y2", "w3"], ["y3"], name="plain_fc", transB=1),
    ]
    inits = {"wq": np.ones((8, 6), np.int8), "s": np.array(0.1, np.float32),
             "z": np.array(0, np.int8), "wh": rand(8, 8).astype(np.float16),
             "w3": rand(4, 8, seed=3)}
    model = make_model(nodes, [("x", ["N", 6])], [("y3", None)], inits, opset=17)
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        result = lsuv_init(model, rand(32, 6), provider="cpu")
    # A float16 weight Cast to float32 is a chain of layout ops: a target, written in float16.
    assert [r.name for r in result.report.layers] == ["cast_fc", "plain_fc"]
    reasons = {s["name"]: s["reason"] for s in result.report.skipped}
    assert "DequantizeLinear" in reasons["quantized_fc"] and "cast_fc" not in reasons
    assert "quantized_fc" in caplog.text
    written = {t.name: t for t in result.model.graph.initializer}
    assert written["wh"].data_type == TensorProto.FLOAT16
    for v in output_variances(result.model, {"x": rand(32, 6)}, ["y2", "y3"]):
        assert abs(v - 1) < 0.1


def test_targets_inside_if_branches_go_through_the_same_rules(caplog):
    """The taken branch's MatMul is a candidate like any (issue 27): its constant weight of
    equal values looks hand-set, so it is left alone by that rule, with a warning."""
    then = helper.make_graph([helper.make_node("MatMul", ["x", "wi"], ["t"], name="inner")],
                             "then", [], [helper.make_tensor_value_info("t", 1, None)],
                             initializer=[helper.make_tensor("wi", 1, [4, 4], [0.1] * 16)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", 1, None)])
    nodes = [helper.make_node("Gemm", ["x0", "w"], ["x"], name="fc", transB=1),
             helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then,
                              else_branch=other)]
    model = make_model(nodes, [("x0", ["N", 4]), ("cond", [], TensorProto.BOOL)],
                       [("out", None)], {"w": rand(4, 4)})
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        result = lsuv_init(model, {"x0": rand(16, 4), "cond": np.array(True)}, provider="cpu")
    assert [r.name for r in result.report.layers] == ["fc"]
    assert [(s["name"], s["by_rule"]) for s in result.report.skipped] == [("inner", True)]
    assert "hand-set" in result.report.skipped[0]["reason"]
    assert "inner" in caplog.text


def test_layer_the_data_never_reaches_is_reported_not_failed():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="live", transB=1),
             helper.make_node("Relu", ["k"], ["kr"]),
             helper.make_node("Gemm", ["kr", "w2"], ["dead_out"], name="dead", transB=1)]
    model = make_model(nodes, [("x", ["N", 4])], [("y", None), ("dead_out", None)],
                       {"w": rand(4, 4), "k": rand(2, 4, seed=5), "w2": rand(3, 4, seed=6)})
    result = lsuv_init(model, rand(16, 4), provider="cpu")
    assert [r.name for r in result.report.layers] == ["live"]
    assert any(s["name"] == "dead" and "not reached" in s["reason"]
               for s in result.report.skipped)


def test_model_without_targets_is_a_clear_message_and_exit_0(tmp_path):
    import onnx

    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", 3])],
                       [("y", None)], {})
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rand(4, 3))
    res = CliRunner().invoke(lsuv_command, [str(tmp_path / "m.onnx"), "--data",
                                            str(tmp_path / "x.npy"), "-o",
                                            str(tmp_path / "o.onnx")])
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output


def test_maxout_fc_is_one_layer_orthonormal_and_scaled_as_a_whole():
    # Gemm -> Split -> Max is maxout, not a fused QKV projection: one layer, one scale.
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Split", ["h"], ["h0", "h1"], axis=1),
        helper.make_node("Max", ["h0", "h1"], ["m"]),
        helper.make_node("Gemm", ["m", "w2"], ["y"], name="fc2", transB=1),
    ]
    model = make_model(nodes, [("x", ["N", 8])], [("y", None)],
                       {"w1": rand(12, 8, seed=1), "b1": rand(12, seed=2),
                        "w2": rand(3, 6, seed=3)})
    x = rand(64, 8, seed=4)
    result = lsuv_init(model, x, provider="cpu")
    assert [r.name for r in result.report.layers] == ["fc1", "fc2"]
    w1 = result.weights["w1"].astype(np.float64)
    gram = w1.T @ w1  # 12x8: orthonormal columns, times the one LSUV scale
    assert np.allclose(gram / gram[0, 0], np.eye(8), atol=1e-5)
    for v in output_variances(result.model, {"x": x}, ["h", "y"]):
        assert abs(v - 1) < 0.1


def _split_gemm(reader_nodes, outputs):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
             helper.make_node("Split", ["h"], ["a", "b", "c"], axis=1), *reader_nodes]
    return make_model(nodes, [("x", ["N", 4])], outputs, {"w": rand(12, 4, seed=1)})


def test_split_read_by_one_non_max_node_stays_a_fused_projection():
    # e.g. Q, K and V into one attention node: still scaled per projection
    model = _split_gemm([helper.make_node("Concat", ["a", "b", "c"], ["y"], axis=1)],
                        [("y", None)])
    assert find_layers(model).layers[0].blocks == ("q", "k", "v")


def test_pairwise_max_over_all_split_parts_is_maxout():
    model = _split_gemm([helper.make_node("Max", ["a", "b"], ["m"]),
                         helper.make_node("Max", ["m", "c"], ["y"])], [("y", None)])
    assert len(find_layers(model).layers[0].blocks) == 1
