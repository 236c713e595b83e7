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
