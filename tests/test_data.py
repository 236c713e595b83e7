import logging

import numpy as np
import pytest

from onnx_lsuv import InputError
from onnx_lsuv.data import load_batch

import models


def test_float64_is_cast_to_float32_with_a_note(caplog):
    model, feeds, _ = models.gemm_mlp(1)
    with caplog.at_level(logging.INFO, logger="onnx_lsuv"):
        out = load_batch(feeds["x"].astype(np.float64), model)
    assert out["x"].dtype == np.float32
    assert "casting" in caplog.text


def test_exact_casts_are_done_and_lossy_ones_refused():
    model, feeds, _ = models.gemm_mlp(1)
    x = feeds["x"]
    big_endian = load_batch(x.astype(">f4"), model)["x"]  # the other byte order: lossless
    assert big_endian.dtype == np.float32 and np.array_equal(big_endian, x)
    for small in (np.int8, np.uint8, np.int16, np.uint16, np.bool_):
        ints = (x * 3).astype(small)
        got = load_batch(ints, model)["x"]  # every value exact in float32
        assert got.dtype == np.float32 and np.array_equal(got, ints.astype(np.float64))
    with pytest.raises(InputError, match="do not all convert exactly to float32"):
        load_batch(np.full(x.shape, 2**24 + 1, np.int64), model)
    assert load_batch(np.full(x.shape, 2**24, np.int64), model)["x"].dtype == np.float32
    with pytest.raises(InputError, match="is not numeric"):
        load_batch(x.astype(np.complex64), model)


def test_floats_are_never_cast_to_integers():
    from onnx import TensorProto, helper

    from conftest import make_model

    model = make_model([helper.make_node("Gather", ["table", "ids"], ["y"])],
                       [("ids", ["N"], TensorProto.INT64)], [("y", None)],
                       {"table": np.ones((4, 2), np.float32)})
    with pytest.raises(InputError, match="expected dtype int64, got float32"):
        load_batch(np.zeros(3, np.float32), model)
    assert load_batch(np.zeros(3, np.int32), model)["ids"].dtype == np.int64


def test_small_batch_warns(caplog):
    model, feeds, _ = models.gemm_mlp(1)
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        load_batch(feeds["x"][:4], model)
    assert "at least 16" in caplog.text


def test_extra_npz_keys_are_ignored_with_a_note_naming_them(caplog):
    model, feeds, _ = models.two_inputs()
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        out = load_batch({**feeds, "labels": np.zeros(3)}, model)
    assert set(out) == set(feeds)
    assert "'labels' is not an input" in caplog.text


def test_a_fed_initializer_is_named_as_a_weight_not_fed(caplog):
    model, feeds, _ = models.gemm_mlp(1)
    from onnx import helper

    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    model.graph.input.append(helper.make_tensor_value_info("w1", w1.data_type, list(w1.dims)))
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        out = load_batch({"x": feeds["x"], "w1": np.zeros(list(w1.dims), np.float32)}, model)
    assert set(out) == {"x"}
    assert "'w1' is a weight the model stores" in caplog.text


def test_wrong_rank_names_input_and_shapes():
    model, feeds, _ = models.gemm_mlp(1)
    with pytest.raises(InputError, match=r"input 'x': expected rank 2 .*\(N, 20\).*\(32, 20, 1\)"):
        load_batch(feeds["x"][..., None], model)


def paddle_minus_one_batch(batch_dim: int):
    """What old paddle2onnx versions write: the batch declared as ``dim_value: -1`` on the
    input and the output (paddle2onnx 2.1 writes a dim_param instead), opset 11."""
    from onnx import helper

    from conftest import make_model, rand

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1)]
    inits = {"w": rand(4, 3, 3, 3, seed=1), "b": np.full(4, 0.3, np.float32),
             "fw": rand(10, 144, seed=2), "fb": np.full(10, -0.5, np.float32)}
    return make_model(nodes, [("x", [batch_dim, 3, 6, 6])], [("y", [batch_dim, 10])], inits,
                      opset=11, ir_version=6)


def test_a_batch_declared_minus_one_is_dynamic_as_in_onnx_runtime(tmp_path):
    """ONNX Runtime takes a negative dim_value as a dynamic axis: so does the data check, and
    the run initialises the layers to unit variance (measured here)."""
    import onnx
    from click.testing import CliRunner

    from onnx_lsuv_cli.main import lsuv_command

    from conftest import initializers, output_variances, rand

    model = paddle_minus_one_batch(-1)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    x = rand(16, 3, 6, 6, seed=3)
    assert load_batch(x, model)["x"].shape == (16, 3, 6, 6)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    args = [tmp_path / "m.onnx", "-d", tmp_path / "x.npy", "-o", tmp_path / "o.onnx"]
    res = CliRunner().invoke(lsuv_command, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    out = onnx.load(tmp_path / "o.onnx")
    assert [abs(v - 1) < 0.05 for v in output_variances(out, {"x": x}, ["c", "y"])] == [True] * 2
    assert [n.SerializeToString() for n in out.graph.node] == \
        [n.SerializeToString() for n in model.graph.node]
    assert out.graph.input[0].SerializeToString() == model.graph.input[0].SerializeToString()
    assert set(initializers(out)) == set(initializers(model))


def test_a_batch_declared_zero_is_refused_saying_onnx_runtime_takes_it_as_a_size():
    """dim_value 0 is a size of 0 to ONNX Runtime (it refuses any other batch), not a dynamic
    axis: refused, saying so."""
    model = paddle_minus_one_batch(0)
    with pytest.raises(InputError, match=r"declares it 0, which ONNX Runtime takes as a size"):
        load_batch(np.zeros((16, 3, 6, 6), np.float32), model)
