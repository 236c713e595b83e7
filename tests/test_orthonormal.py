import numpy as np
import pytest

from onnx_lsuv.layouts import WeightLayout
from onnx_lsuv.orthonormal import (
    _householder_q,
    orthonormal_many,
    orthonormal_matrices,
    tall_orthonormal,
)


def assert_orthonormal(m: np.ndarray, atol: float = 1e-5) -> None:
    rows, cols = m.shape
    gram = m @ m.T if rows <= cols else m.T @ m
    np.testing.assert_allclose(gram, np.eye(min(rows, cols)), atol=atol)


@pytest.mark.parametrize("groups,rows,cols", [(1, 8, 27), (2, 4, 18), (8, 1, 9), (1, 32, 20),
                                              (1, 300, 1200), (3, 5, 5), (1, 600, 256),
                                              (1, 512, 768), (1, 512, 1024), (1, 256, 2304)])
def test_every_group_is_orthonormal(groups, rows, cols):
    mats = orthonormal_matrices(groups, rows, cols, np.random.default_rng(0))
    assert mats.shape == (groups, rows, cols) and mats.dtype == np.float32
    for m in mats:
        assert_orthonormal(m.astype(np.float64))


@pytest.mark.parametrize("shape", [(1200, 300), (500, 300)])  # one pass; two passes
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cholesky_qr_gives_the_householder_q(shape, dtype):
    # Same Q (positive-diagonal R) means the same distribution as the sign-fixed QR.
    a = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    q_chol = tall_orthonormal(a.copy())
    q_house = _householder_q(a.copy())
    np.testing.assert_allclose(q_chol, q_house, atol=1e-9 if dtype == np.float64 else 2e-5)


def test_sign_fix_makes_draws_unbiased():
    # Without the sign fix, scipy's Q has a biased first column sign; with it, the mean entry
    # over many draws is ~0 for every position.
    rng = np.random.default_rng(2)
    mean = np.mean([orthonormal_matrices(1, 3, 3, rng, np.float64)[0] for _ in range(4000)],
                   axis=0)
    assert np.abs(mean).max() < 0.05


def test_same_seed_same_bytes_other_seed_other_weights():
    shapes = [(1, 16, 27), (2, 8, 36), (1, 10, 64)]
    dts = [np.dtype(np.float32)] * 3
    a = orthonormal_many(shapes, 0, dts, workers=2)
    b = orthonormal_many(shapes, 0, dts, workers=1)
    c = orthonormal_many(shapes, 1, dts, workers=2)
    for x, y, z in zip(a, b, c):
        assert x.tobytes() == y.tobytes()
        assert not np.array_equal(x, z)


@pytest.mark.parametrize("op,shape,groups,trans", [
    ("Conv", (16, 4, 3, 3), 1, False), ("Conv", (8, 1, 3, 3), 8, False),
    ("ConvTranspose", (4, 6, 3, 3), 2, False), ("Gemm", (20, 32), 1, False),
    ("Gemm", (32, 20), 1, True), ("MatMul", (64, 16), 1, False)])
def test_orthonormal_in_every_layout(op, shape, groups, trans):
    layout = WeightLayout(op, shape, groups, trans)
    mats = orthonormal_matrices(*layout.matrix_shape, np.random.default_rng(0))
    w = layout.from_matrices(mats)
    for m in layout.to_matrices(w):
        assert_orthonormal(m)


BIG_SHAPES = [(1, 2048, 2048), (1, 1024, 4096)]  # 2^22 elements: Householder; CholeskyQR


def test_big_draws_have_the_same_bits_for_any_thread_count():
    ref = orthonormal_many(BIG_SHAPES, 3, [np.float32] * 2, workers=1)
    for workers in (2, 3):
        got = orthonormal_many(BIG_SHAPES, 3, [np.float32] * 2, workers=workers)
        assert all(np.array_equal(a, b) for a, b in zip(ref, got)), workers
    for m in ref:
        assert_orthonormal(m[0].astype(np.float64), atol=2e-5)


def test_big_draws_do_not_depend_on_openblas_threads_or_the_cpu_count():
    import os
    import subprocess
    import sys

    code = ("import hashlib, numpy as np\n"
            "from onnx_lsuv.orthonormal import orthonormal_many\n"
            "q = orthonormal_many([(1, 1024, 4096)], 5, [np.float32])[0]\n"
            "print(hashlib.sha256(q.tobytes()).hexdigest())\n")
    digests = set()
    for threads, cpus in (("1", "0"), ("2", "0,1")):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
        cmd = [sys.executable, "-c", code]
        if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
            cmd = ["taskset", "-c", cpus] + cmd
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1
