import numpy as np
import pytest

from onnx_lsuv.layouts import WeightLayout

CASES = [
    ("Conv", (8, 3, 3, 3), 1, False, (1, 8, 27)),
    ("Conv", (8, 2, 3, 3), 2, False, (2, 4, 18)),
    ("Conv", (8, 1, 3), 8, False, (8, 1, 3)),
    ("Conv", (6, 4, 2, 2, 2), 1, False, (1, 6, 32)),
    ("ConvTranspose", (4, 6, 3, 3), 1, False, (1, 6, 36)),
    ("ConvTranspose", (4, 3, 3, 3), 2, False, (2, 3, 18)),
    ("Gemm", (20, 32), 1, False, (1, 32, 20)),
    ("Gemm", (32, 20), 1, True, (1, 32, 20)),
    ("MatMul", (12, 24), 1, False, (1, 24, 12)),
]


@pytest.mark.parametrize("op,shape,groups,trans,expected", CASES)
def test_matrix_view_round_trips_bit_for_bit(op, shape, groups, trans, expected):
    layout = WeightLayout(op, shape, groups, trans)
    assert layout.matrix_shape == expected
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    m = layout.to_matrices(w)
    assert m.shape == expected
    back = layout.from_matrices(m)
    assert back.shape == shape and back.flags.c_contiguous
    assert np.array_equal(back, w)


def test_conv_transpose_rows_are_output_units():
    # W[c, m, kh, kw]: output unit m of group 0 reads input channels 0..C/g-1.
    w = np.zeros((4, 3, 1, 1), np.float32)
    w[1, 2, 0, 0] = 7.0  # input channel 1 -> output unit 2 (group 0 when g=2)
    m = WeightLayout("ConvTranspose", w.shape, 2).to_matrices(w)
    assert m[0, 2, 1] == 7.0 and np.count_nonzero(m) == 1


def test_gemm_output_units_follow_transB():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)  # (K=2, N=3)
    assert np.array_equal(WeightLayout("Gemm", (2, 3)).to_matrices(w)[0], w.T)
    assert np.array_equal(WeightLayout("Gemm", (2, 3), trans=True).to_matrices(w)[0], w)


@pytest.mark.parametrize("op,shape,groups", [("Conv", (7, 3, 3, 3), 2), ("Gemm", (3,), 1),
                                             ("Conv", (4, 4), 1), ("Relu", (2, 2), 1)])
def test_invalid_layouts_are_refused(op, shape, groups):
    with pytest.raises(ValueError):
        WeightLayout(op, shape, groups)
