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


def test_lossy_or_odd_dtype_is_refused():
    model, feeds, _ = models.gemm_mlp(1)
    with pytest.raises(InputError, match="expected dtype float32"):
        load_batch(feeds["x"].astype(np.int8), model)


def test_small_batch_warns(caplog):
    model, feeds, _ = models.gemm_mlp(1)
    with caplog.at_level(logging.WARNING, logger="onnx_lsuv"):
        load_batch(feeds["x"][:4], model)
    assert "at least 16" in caplog.text


def test_unknown_npz_keys_are_named():
    model, feeds, _ = models.two_inputs()
    with pytest.raises(InputError, match="unknown key.*c"):
        load_batch({**feeds, "c": feeds["a"]}, model)


def test_wrong_rank_names_input_and_shapes():
    model, feeds, _ = models.gemm_mlp(1)
    with pytest.raises(InputError, match=r"input 'x': expected rank 2 .*\(N, 20\).*\(32, 20, 1\)"):
        load_batch(feeds["x"][..., None], model)
