import numpy as np
import pytest

from onnx_lsuv.layouts import WeightLayout
from onnx_lsuv.orthonormal import orthonormal_many, orthonormal_matrices, stewart_q


def assert_orthonormal(m: np.ndarray, atol: float = 1e-5) -> None:
    rows, cols = m.shape
    gram = m @ m.T if rows <= cols else m.T @ m
    np.testing.assert_allclose(gram, np.eye(min(rows, cols)), atol=atol)


@pytest.mark.parametrize("groups,rows,cols", [(1, 8, 27), (2, 4, 18), (8, 1, 9), (1, 32, 20),
                                              (1, 300, 1200), (3, 5, 5), (1, 600, 256),
                                              (1, 512, 768), (1, 512, 1024), (1, 256, 2304),
                                              (2, 1000, 1100), (1, 1300, 700)])
def test_every_group_is_orthonormal(groups, rows, cols):
    mats = orthonormal_matrices(groups, rows, cols, np.random.default_rng(0))
    assert mats.shape == (groups, rows, cols) and mats.dtype == np.float32
    for m in mats:
        assert_orthonormal(m.astype(np.float64))


def _lapack_stewart_q(m, n, seeds, nb):
    """Q from the same Gaussian vectors, built with LAPACK's own dlarfg and dorgqr."""
    from scipy.linalg import lapack

    a = np.zeros((m, n))
    tau = np.zeros(n)
    signs = np.ones(n)
    for k, j0 in enumerate(range(0, n, nb)):
        j1 = min(j0 + nb, n)
        x = np.random.default_rng(int(seeds[k])).standard_normal((m - j0, j1 - j0))
        for i in range(j1 - j0):
            col = x[i:, i]
            beta, v, t = lapack.dlarfg(len(col), col[0], col[1:].copy())
            if len(col) == 1 or t == 0:  # LAPACK leaves a 1-vector alone; we reflect it
                beta, v, t = -col[0], v, 2.0
            j = j0 + i
            a[j + 1:, j], tau[j], signs[j] = v, t, np.sign(beta)
    q, _, info = lapack.dorgqr(a, tau)
    assert info == 0
    return q * signs


@pytest.mark.parametrize("m,n,nb,chunk", [(7, 5, 2, 2), (40, 40, 8, 16), (300, 130, 32, 64),
                                          (500, 500, 96, 384)])
def test_stewart_q_is_lapacks_q_of_the_same_reflectors(m, n, nb, chunk):
    seeds = np.random.default_rng(4).integers(0, 2**63 - 1, size=-(-n // nb))
    ours = stewart_q(m, n, seeds, np.float64, nb=nb, chunk=chunk)
    np.testing.assert_allclose(ours, _lapack_stewart_q(m, n, seeds, nb), atol=1e-10)


def _draw(path, n, rng):
    if path == "batched":
        return orthonormal_matrices(1, n, n, rng, np.float64)[0]
    return stewart_q(n, n, rng.integers(0, 2**63 - 1, size=n), np.float64, nb=1, chunk=1)


@pytest.mark.parametrize("path", ["batched", "stewart"])
def test_draws_are_haar_distributed(path):
    # Haar measure on O(3): det = +1 or -1 with probability 1/2 each, and det(Q) Q is then
    # Haar on SO(3), whose rotation angle t (eigenvalues 1, exp(+-it)) has CDF
    # (t - sin t) / pi (Weyl's integration formula). And on O(n), E tr Q = 0, E (tr Q)^2 = 1.
    from scipy import stats

    rng = np.random.default_rng(11)
    angles = {1: [], -1: []}
    for _ in range(3000):
        q = _draw(path, 3, rng)
        det = int(np.sign(np.linalg.det(q)))
        eig = np.linalg.eigvals(q * det)  # a rotation: eigenvalues 1, exp(+-it)
        angles[det].append(float(np.abs(np.angle(eig)).max()))
    n_pos = len(angles[1])
    assert stats.binomtest(n_pos, 3000).pvalue > 1e-3
    for det in (1, -1):
        assert stats.kstest(angles[det], lambda t: (t - np.sin(t)) / np.pi).pvalue > 1e-3, det
    traces = np.array([np.trace(_draw(path, 6, rng)) for _ in range(3000)])
    assert abs(traces.mean()) < 4 / np.sqrt(3000)
    assert abs((traces ** 2).mean() - 1) < 0.15


def test_tall_draws_have_uniform_columns():
    # Each column of a Haar m x n draw is uniform on the sphere S^(m-1): an entry squared is
    # Beta(1/2, (m-1)/2).
    from scipy import stats

    rng = np.random.default_rng(12)
    first, last = [], []
    for _ in range(2000):
        q = stewart_q(10, 4, rng.integers(0, 2**63 - 1, size=2), np.float64, nb=2, chunk=2)
        first.append(q[0, 0] ** 2)
        last.append(q[9, 3] ** 2)
    for sample in (first, last):
        assert stats.kstest(sample, stats.beta(0.5, 4.5).cdf).pvalue > 1e-3


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


BIG_SHAPES = [(1, 2048, 2048), (1, 1024, 4096)]  # 2^22 elements: blocks on every thread


def test_big_draws_have_the_same_bits_for_any_thread_count():
    ref = orthonormal_many(BIG_SHAPES, 3, [np.float32] * 2, workers=1)
    for workers in (2, 3):
        got = orthonormal_many(BIG_SHAPES, 3, [np.float32] * 2, workers=workers)
        assert all(np.array_equal(a, b) for a, b in zip(ref, got)), workers
    for m in ref:
        assert_orthonormal(m[0].astype(np.float64), atol=1e-5)


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
