"""Orthonormal pre-initialisation (Saxe et al. 2014), over the matrix views of ``layouts``.

Each matrix is the Q factor of a Gaussian draw, with the signs of R's diagonal folded in so that
the result is uniformly (Haar) distributed. Rows are orthonormal when a matrix has no more rows
than columns, columns otherwise.

Tall, well-conditioned draws use CholeskyQR: a GEMM, a Cholesky and a triangular solve. Its R has
a positive diagonal, so its Q is the matrix Householder QR gives after the sign fix (the same
draw, to rounding), at less cost for large shapes. A Gaussian m x n draw has condition number
about (sqrt(m) + sqrt(n)) / (sqrt(m) - sqrt(n)) and CholeskyQR loses orthogonality as its square:
from m >= 2n (condition <= 5.8) one pass leaves |Q^T Q - I| <= 1.2e-6 in float32 (measured on
ResNet and CaffeNet shapes), for 1.5n <= m < 2n a second pass brings it to 5e-7, and nearer to
square it is Householder QR (scipy).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

# Every draw runs with one BLAS thread: OpenBLAS's own threads split reductions (dot products,
# norms, GEMMs over the long axis) by thread count, so a 4096 x 9216 draw came out with other
# bits at 2 threads than at 1. Parallelism comes from threads over layers instead, and inside a
# big CholeskyQR draw from fixed blocks (so the bits never depend on how many threads run
# them). Matrices of at least this many elements are drawn one at a time, with their blocks in
# parallel; the rest in parallel threads, one layer each. On 2 cores OpenBLAS's own threads made
# the QR of ResNet-18's weights 3x slower (1.8 s) than one thread per layer (0.6 s).
BIG_MATRIX = 1 << 22
BLOCK = 1024  # rows per block of a big CholeskyQR solve: fixed, never per thread count
GRAM_PARTS = 4  # partial Gram matrices of a big CholeskyQR draw, summed in order

# Long side / short side from which CholeskyQR2, and from which one CholeskyQR pass, is used.
CHOLQR2_MIN_ASPECT = 1.5
CHOLQR_MIN_ASPECT = 2.0
CHOLQR_MIN_SIZE = 256


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 weights are drawn in float64; every other float type in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _householder_q(a: np.ndarray) -> np.ndarray:
    q, r = scipy.linalg.qr(a, mode="economic", overwrite_a=True, check_finite=False)
    signs = np.sign(np.diagonal(r)).astype(q.dtype)
    signs[signs == 0] = 1
    return q * signs


def _blocks(n: int) -> list[slice]:
    return [slice(k, min(k + BLOCK, n)) for k in range(0, n, BLOCK)]


def _row_quarters(n: int) -> list[slice]:
    edges = np.linspace(0, n, GRAM_PARTS + 1).astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _cholesky_q(a: np.ndarray, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """One CholeskyQR step: Q = A R^-1 with R = chol(A^T A); raises LinAlgError if not SPD.

    With ``pool``, the Gram matrix is the sum, in a fixed order, of GRAM_PARTS partial Grams of
    A's row blocks, and Q is solved by blocks of A's rows: the arithmetic is the same whatever
    the number of threads that run the blocks."""
    if pool is None:
        gram = a.T @ a
    else:  # partial Grams of fixed row blocks (each a SYRK), summed in block order
        parts = list(pool.map(lambda rows: a[rows].T @ a[rows], _row_quarters(a.shape[0])))
        gram = parts[0]
        for part in parts[1:]:
            gram += part
    r = scipy.linalg.cholesky(gram, lower=False, check_finite=False)
    if pool is None:
        return scipy.linalg.solve_triangular(r, a.T, trans="T", lower=False,
                                             check_finite=False).T
    q = np.empty_like(a)

    def solve_block(rows: slice) -> None:
        q[rows] = scipy.linalg.solve_triangular(r, a[rows].T, trans="T", lower=False,
                                                check_finite=False).T

    list(pool.map(solve_block, _blocks(a.shape[0])))
    return q


def tall_orthonormal(a: np.ndarray, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Q factor (positive-diagonal R convention) of a tall or square matrix ``a`` (CholeskyQR
    blocks run on ``pool`` when given)."""
    m, n = a.shape
    if n >= CHOLQR_MIN_SIZE and m >= CHOLQR2_MIN_ASPECT * n:
        try:
            q = _cholesky_q(a, pool)
            if m < CHOLQR_MIN_ASPECT * n:
                q = _cholesky_q(q, pool)
            if np.all(np.isfinite(q)):
                return np.ascontiguousarray(q)
        except np.linalg.LinAlgError:
            pass
    return _householder_q(a)


def orthonormal_matrices(
    groups: int, rows: int, cols: int, rng: np.random.Generator, dtype: np.dtype = np.float32,
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    """Draw ``groups`` orthonormal (rows x cols) matrices.

    Args:
        groups: Number of independent matrices.
        rows: Output units per matrix.
        cols: Fan-in per matrix.
        rng: The random generator to draw from; the result depends only on its state.
        dtype: float32 or float64. Defaults to float32.
        pool: Threads for a big draw, which then comes in fixed blocks (the Gaussian noise by
            row blocks from child generators, the CholeskyQR by blocks): its bits depend on
            the seed alone, not on how many threads the pool has. Defaults to none (one
            generator, one thread; what small draws use).

    Returns:
        Array of shape (groups, rows, cols): W W^T = I if rows <= cols, else W^T W = I.
    """
    dtype = np.dtype(dtype)
    tall, short = max(rows, cols), min(rows, cols)
    if pool is None:
        draws = rng.standard_normal((groups, tall, short), dtype=dtype)
    else:  # fixed row blocks, each from its own child generator, drawn in parallel
        draws = np.empty((groups, tall, short), dtype=dtype)
        blocks = [(g, rows_) for g in range(groups) for rows_ in _blocks(tall)]
        children = [np.random.default_rng(int(k)) for k in
                    rng.integers(0, 2**63 - 1, size=len(blocks), dtype=np.int64)]

        def draw(k: int) -> None:
            g, rows_ = blocks[k]
            draws[g, rows_] = children[k].standard_normal((rows_.stop - rows_.start, short),
                                                          dtype=dtype)

        list(pool.map(draw, range(len(blocks))))
    out = np.empty((groups, rows, cols), dtype=dtype)
    for i in range(groups):
        q = tall_orthonormal(draws[i], pool)
        out[i] = q.T if rows <= cols else q
    return out


def default_workers() -> int:
    """CPUs this process may run on (containers restrict affinity; ``os.cpu_count`` does not)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def orthonormal_many(
    shapes: Sequence[tuple[int, int, int]],
    seed: int,
    dtypes: Sequence[np.dtype],
    workers: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Orthonormal matrices for many layers, in parallel threads (LAPACK releases the GIL).

    Layer ``i`` draws from its own generator seeded with ``(seed, i)``, so the result does not
    depend on the number of threads or the order in which layers finish. The largest layers are
    started first.

    Args:
        shapes: (groups, rows, cols) per layer.
        seed: Base seed.
        dtypes: Compute dtype per layer.
        workers: Thread count. Defaults to the CPUs available to this process.
        on_done: Called with a layer's index when its matrices are ready (in this thread).
            Defaults to none.

    Returns:
        One (groups, rows, cols) array per layer, in the order of ``shapes``.
    """

    def job(i: int, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        g, r, c = shapes[i]
        return orthonormal_matrices(g, r, c, np.random.default_rng([seed, i]), dtypes[i], pool)

    def finished(i: int, res: np.ndarray) -> None:
        results[i] = res
        if on_done is not None:
            on_done(i)

    order = sorted(range(len(shapes)), key=lambda i: -int(np.prod(shapes[i])))
    big = [i for i in order if int(np.prod(shapes[i])) >= BIG_MATRIX]
    small = [i for i in order if int(np.prod(shapes[i])) < BIG_MATRIX]
    workers = workers or default_workers()
    results: list[np.ndarray | None] = [None] * len(shapes)
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for i in big:  # the blocked draw for every big matrix, whatever the thread count
            finished(i, job(i, pool))
        if workers <= 1 or len(small) <= 1:
            for i in small:
                finished(i, job(i))
        else:
            for i, res in zip(small, pool.map(job, small)):
                finished(i, res)
    return results  # type: ignore[return-value]
